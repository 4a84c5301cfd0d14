#!/usr/bin/env bash
# glmrt's GPU suite, one command: `bash benchmarks/gpu_suite.sh --key` runs every key number inside
# one lease of a GPU machine (540 s, at most 8 files); --dry-run runs the same steps on the CPU.
# The suite itself is benchmarks/suite.py (its docstring lists the steps, options and files); this
# wrapper only picks the Python: $PYTHON, else python3.
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/suite.py" "$@"
