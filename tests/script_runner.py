"""Run several Python scripts one after the other in this one process (the runner of the smoke tests).

``python tests/script_runner.py SPEC.json OUT``: ``SPEC.json`` lists the runs, each
``{"name": ..., "script": path, "args": [...], "cwd": folder, "env": {variable: value}}``. Each script runs as
``__main__`` (``runpy.run_path``) with ``sys.argv = [script, *args]``, ``sys.path[0]`` its own folder, in ``cwd``
and with ``env`` added to ``os.environ``; its stdout and stderr (file descriptors 1 and 2, so C-level output
too) go to ``OUT/<name>.stdout`` and ``OUT/<name>.stderr``, and ``OUT/<name>.status`` says ``ok`` or ``failed``
(the traceback is then at the end of its stderr). A failing script does not stop the others.

Python start-up and the imports of torch, Lightning and ``lightning_dve`` are paid once instead of once per
script. The process state a script may change (the environment, torch's thread count, default dtype, RNG state,
grad mode and deterministic flag, the warning filters, ``sys.argv``, ``sys.path`` and the working directory) is
reset to the runner's start state before each script. Exits 1 if any script failed.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def redirected(stdout: Path, stderr: Path) -> Iterator[None]:
    """Point file descriptors 1 and 2 (and so ``sys.stdout`` / ``sys.stderr``) at two files, then back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with stdout.open("wb") as out, stderr.open("wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextmanager
def fresh_state(run: dict[str, Any]) -> Iterator[None]:
    """Give one script the start state of a fresh ``python <script> <args>`` process (as far as it can), then
    restore the runner's."""
    argv, path, here, environ = sys.argv[:], sys.path[:], os.getcwd(), dict(os.environ)
    threads, dtype, rng = torch.get_num_threads(), torch.get_default_dtype(), torch.random.get_rng_state()
    grad, deterministic = torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled()
    sys.argv = [run["script"], *run.get("args", [])]
    sys.path[0] = str(Path(run["script"]).resolve().parent)  # a script's own folder, not the runner's
    os.environ.update(run.get("env", {}))
    os.chdir(run["cwd"])
    try:
        with warnings.catch_warnings():
            yield
    finally:
        sys.argv, sys.path[:] = argv, path
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(here)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.random.set_rng_state(rng)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(deterministic)


def run_one(run: dict[str, Any], out: Path) -> bool:
    """Run one script of the spec; write its output and status files; return whether it succeeded."""
    name = run["name"]
    Path(run["cwd"]).mkdir(parents=True, exist_ok=True)
    ok = True
    with redirected(out / f"{name}.stdout", out / f"{name}.stderr"), fresh_state(run):
        try:
            runpy.run_path(run["script"], run_name="__main__")
        except SystemExit as done:
            ok = done.code in (None, 0)
            if not ok:
                print(f"{name}: SystemExit({done.code!r})", file=sys.stderr)
        except Exception:  # noqa: BLE001 - reported in the script's stderr file, the others still run
            ok = False
            traceback.print_exc()
    (out / f"{name}.status").write_text("ok" if ok else "failed")
    return ok


def run_all(runs: list[dict[str, Any]], out: Path) -> dict[str, bool]:
    """Run each script of ``runs`` in order; return ``{name: succeeded}``."""
    out.mkdir(parents=True, exist_ok=True)
    return {run["name"]: run_one(run, out) for run in runs}


def launch(runs: list[dict[str, Any]], out: Path, timeout: float) -> str:
    """Run this runner on ``runs`` in a child process (this checkout's package first); return its own stderr."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "runs.json"
    spec.write_text(json.dumps(runs))
    done = subprocess.run([sys.executable, __file__, str(spec), str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=out, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.stderr


def read_run(out: Path, name: str, runner_stderr: str) -> str:
    """The stdout of run ``name`` of a finished runner; fail with its stderr (or the runner's) if it failed."""
    status = out / f"{name}.status"
    assert status.is_file(), f"the runner died before {name} finished:\n{runner_stderr[-3000:]}"
    stdout, stderr = (out / f"{name}.stdout").read_text(), (out / f"{name}.stderr").read_text()
    assert status.read_text() == "ok", f"{name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    results = run_all(runs, Path(sys.argv[2]).resolve())
    for name, ok in results.items():
        print(f"{name}: {'ok' if ok else 'failed'}", flush=True)
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
