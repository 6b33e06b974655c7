"""The built wheel: every module of the package and its PEP 561 marker, so type checkers use its hints."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_and_the_typed_marker(tmp_path: Path) -> None:
    """Builds the wheel offline (no build isolation: the setuptools of this environment) from a copy of the
    sources, so the checkout gets no ``build/`` folder."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lightning_dve", source / "lightning_dve", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("lightning_dve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"lightning_dve/{path.name}" for path in (ROOT / "lightning_dve").glob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "lightning_dve/py.typed" in names


def test_queries_need_no_lightning_import_and_the_callback_imports_it_at_first_use() -> None:
    """A process that loads and queries a store imports no Lightning (7 s on a slow 2-core machine); the callback
    is still ``lightning_dve.DataValueEmbedding``, the class of ``lightning_dve.callback``."""
    code = ("import sys, lightning_dve\n"
            "from lightning_dve import DataValueEmbeddings, ReportConfig\n"
            "assert 'lightning' not in sys.modules, 'lightning imported'\n"
            "from lightning_dve import DataValueEmbedding\n"
            "from lightning_dve.callback import DataValueEmbedding as Callback\n"
            "assert DataValueEmbedding is Callback and 'lightning' in sys.modules\n"
            "assert 'DataValueEmbedding' in lightning_dve.__all__\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
