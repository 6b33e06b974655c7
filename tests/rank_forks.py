"""A warm parent for the 2-rank runs that start both ranks at once (``test_distributed.run_ranks``).

``python tests/rank_forks.py`` imports torch, Lightning, ``lightning_dve`` and ``tests/scripts/ddp_run.py`` once,
then reads one request per line on stdin, ``{"argv": [...], "env": {...}, "logs": [[out, err], [out, err]],
"timeout": seconds}``, forks both ranks of it (``LOCAL_RANK`` 0 and 1 in their environment, as torchrun sets it),
and answers one line, ``{"codes": [c0, c1]}`` or ``{"timeout": true}`` (both killed). Each rank runs
``ddp_run.main()`` as a fresh ``python ddp_run.py ARGV`` would: its output to its two files, an uncaught error
through ``sys.excepthook`` (under DDP torch's, which prefixes ``[rankN]:``), the ``atexit`` functions, then the exit
code. The ranks do not import anything again: 7 s a rank on a slow 2-core machine, 3 s on a fast one.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import ddp_run  # noqa: E402  (after its folder is on the path, as a script's own folder is)


def _rank(request: dict[str, Any], rank: int) -> None:
    """The forked rank: run ``ddp_run.main()`` as its own process would, then leave without returning."""
    code = 0
    try:
        out, err = request["logs"][rank]
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.update({**request["env"], "LOCAL_RANK": str(rank)})
        sys.argv = [ddp_run.__file__, *request["argv"]]
        code = ddp_run.main() or 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - what an uncaught error does: the hook prints it, the exit code is 1
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(request: dict[str, Any]) -> dict[str, Any]:
    """Fork both ranks of ``request`` and wait for them (both killed after its timeout)."""
    sys.stdout.flush()
    pids = []
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:
            _rank(request, rank)
        pids.append(pid)
    deadline, codes = time.monotonic() + request["timeout"], {}
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes and (done := os.waitpid(pid, os.WNOHANG))[0]:
                codes[pid] = os.waitstatus_to_exitcode(done[1])
        time.sleep(0.05)
    if len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        return {"timeout": True}
    return {"codes": [codes[pid] for pid in pids]}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
