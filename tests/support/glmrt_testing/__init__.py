"""Helpers shared by the tests and the benchmarks: tiny random checkpoints built with transformers,
generated documents, a real `glmrt serve` process, references.

The package lives under tests/support/, which pytest (`pythonpath` in pyproject.toml) and the
benchmarks put on sys.path instead of the repository root: the root must never be importable,
or its top-level `kernels/` folder shadows the Hub's `kernels` package that transformers imports.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent.parent  # tests/support: on sys.path in tests and benchmarks
REPO = SUPPORT.parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python that imports this package (`python -m glmrt_testing.fault_server`).
    Run such a child with cwd=SUPPORT: `python -m` puts its working directory first on sys.path."""
    path = os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def glmrt_command(*args: str) -> list[str]:
    """`glmrt ARGS...` through the console script of this interpreter's environment, as a user runs
    it: its sys.path starts at the script's folder, never at the working directory, so it may run
    from the repository root (`python -m glmrt` there would import the root's `kernels/`)."""
    script = Path(sys.executable).with_name("glmrt")
    found = str(script) if script.is_file() else shutil.which("glmrt")
    if found is None:
        raise RuntimeError("the glmrt console script is not installed: pip install -e .")
    return [found, *args]
