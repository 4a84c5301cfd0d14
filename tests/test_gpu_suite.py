"""benchmarks/gpu_suite.sh without a GPU: its dry run, its refusal to run on a CPU, and its
plumbing (--allow-cpu): per-step status and logs, a failing or hung step not stopping the suite,
SUMMARY.md with the benchmarks' key numbers, and the tarball. The benchmarks themselves run only
where cheap (patchify); a stand-in python makes the glmrt._C check fail or hang on demand."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from glmrt_testing import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = ["install", "cpp-ext", "gpu-tests", "bench-kernels", "bench-e2e", "bench-spec", "bench-host", "bench-structured",
         "bench-patchify", "bench-serve", "bench-documents", "bench-capacity", "bench-glm-image",
         "kernel-tests-gpu"]


def run_suite(*args: str, python: str = sys.executable, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stand_in_python(tmp_path: Path, on_cpp_check: str) -> str:
    """A python that runs `on_cpp_check` (shell) instead of the glmrt._C check, else the real one."""
    path = tmp_path / "python"
    path.write_text(f'#!/usr/bin/env bash\nif [[ "$*" == *glmrt._C* ]]; then {on_cpp_check}; fi\n'
                    f'exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def step_rows(results: Path) -> dict[str, list[str]]:
    """steps.tsv as {step: [status, exit, seconds, timeout]}."""
    lines = (results / "steps.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "status", "exit", "seconds", "timeout"]
    return {row[0]: row[1:] for row in (line.split("\t") for line in lines[1:])}


def test_dry_run_lists_every_step(tmp_path):
    out = tmp_path / "results"
    done = run_suite("--dry-run", "--out", str(out), "--skip", "bench-e2e")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[1] for line in done.stdout.splitlines() if line.split()[0].rstrip(".").isdigit()]
    assert listed == STEPS
    assert "pip install --no-build-isolation --no-deps -e ." in done.stdout
    assert f"benchmarks/kernel_bench.py --out {out}" in done.stdout
    assert "env -u TRITON_INTERPRET" in done.stdout
    assert any("bench-e2e" in line and "skipped (--skip)" in line for line in done.stdout.splitlines())
    assert not out.exists()


def test_quick_dry_run_passes_smoke_to_the_benchmarks(tmp_path):
    done = run_suite("--dry-run", "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"benchmarks/kernel_bench.py --out {tmp_path} --smoke" in done.stdout
    assert f"benchmarks/e2e.py --out {tmp_path} --smoke" in done.stdout
    assert f"benchmarks/serve.py --out {tmp_path} --smoke" in done.stdout
    assert any("kernel-tests-gpu" in line and "skipped (--quick)" in line for line in done.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    (["--skip", "bench-kernels,nope"], "unknown step 'nope'"),
    (["--budget", "ten"], "--budget must be a whole number of seconds, got 'ten'"),
    (["--frobnicate"], "unknown argument: --frobnicate"),
])
def test_bad_arguments_are_named(args, message):
    done = run_suite("--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_to_run_without_a_gpu(tmp_path):
    done = run_suite("--out", str(tmp_path / "results"))
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "results").exists()


def test_allow_cpu_quick_run_writes_summary_and_tarball(tmp_path):
    """The glmrt._C check fails (exit 3); patchify still runs and its numbers reach SUMMARY.md."""
    results, tarball = tmp_path / "results", tmp_path / "packed" / "suite.tar.gz"
    done = run_suite("--allow-cpu", "--quick", "--only", "cpp-ext,bench-patchify",
                     "--out", str(results), "--tar", str(tarball),
                     python=stand_in_python(tmp_path, "exit 3"))
    assert done.returncode == 1, done.stdout + done.stderr  # a required step failed
    rows = step_rows(results)
    assert list(rows) == STEPS
    assert rows["cpp-ext"][:2] == ["FAIL", "3"]
    assert rows["bench-patchify"][:2] == ["PASS", "0"]
    assert rows["install"][0] == rows["bench-kernels"][0] == "SKIPPED"
    assert rows["bench-host"][0] == "SKIPPED"  # not in --only
    summary = (results / "SUMMARY.md").read_text()
    assert "| cpp-ext | FAIL (exit 3) |" in summary and "| bench-patchify | PASS |" in summary
    assert "- overall: FAIL" in summary
    assert "### patchify-" in summary and "19276 patches: numpy" in summary
    assert (results / "environment.md").read_text().count("- commit: `") == 1
    assert "import glmrt._C" in (results / "logs" / "cpp-ext.log").read_text()
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"results/SUMMARY.md", "results/steps.tsv", "results/logs/bench-patchify.log"} <= names
    assert any(n.startswith("results/patchify-") and n.endswith(".json") for n in names)


def test_serve_and_documents_benchmarks_are_skipped_without_their_extras(tmp_path):
    """A python without fastapi or pypdfium2: bench-serve and bench-documents are skipped with the
    import error, not run and failed."""
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\nif [[ "$*" == *"import fastapi"* ]]; then\n'
                      '    echo "ModuleNotFoundError: No module named \'fastapi\'" >&2; exit 1\nfi\n'
                      'if [[ "$*" == *"import pypdfium2"* ]]; then\n'
                      '    echo "ModuleNotFoundError: No module named \'pypdfium2\'" >&2; exit 1\nfi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    done = run_suite("--dry-run", python=str(python))
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if " bench-serve " in line)
    assert "skipped (glmrt[serve] is not installed (ModuleNotFoundError: No module named 'fastapi'))" in line
    line = next(line for line in done.stdout.splitlines() if " bench-documents " in line)
    assert "skipped (glmrt[documents] or glmrt[serve] is not installed (ModuleNotFoundError: No module named " \
           "'pypdfium2'))" in line


def test_allow_cpu_quick_serve_benchmark_reaches_the_summary(tmp_path):
    """benchmarks/serve.py --smoke against a real glmrt serve process; its rows reach SUMMARY.md."""
    results = tmp_path / "results"
    done = run_suite("--allow-cpu", "--quick", "--only", "bench-serve", "--out", str(results), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert step_rows(results)["bench-serve"][:2] == ["PASS", "0"]
    summary = (results / "SUMMARY.md").read_text()
    assert "### serve-cpu-" in summary and "tiny test checkpoint, 16 region requests" in summary
    for concurrency in (1, 8, 16):  # 32 in flight is capped by the 16 requests
        assert f"| glmrt serve | {concurrency} |" in summary


def test_hung_step_is_cut_by_the_budget(tmp_path):
    """A step that hangs is killed when the budget runs out; the steps after it are skipped."""
    results = tmp_path / "results"
    done = run_suite("--allow-cpu", "--budget", "12", "--only", "cpp-ext,bench-patchify",
                     "--out", str(results), python=stand_in_python(tmp_path, "sleep 600"))
    assert done.returncode == 1
    rows = step_rows(results)
    assert rows["cpp-ext"][0] == "TIMEOUT" and int(rows["cpp-ext"][3]) <= 12
    assert rows["bench-patchify"][0] == "SKIPPED"
    assert "budget spent" in (results / "SUMMARY.md").read_text()


def test_allow_cpu_quick_documents_benchmark_reaches_the_summary(tmp_path):
    """benchmarks/documents.py --smoke: glmrt parse in process and the glmocr SDK against a real
    glmrt serve process, over generated PDFs; its rows reach SUMMARY.md."""
    results = tmp_path / "results"
    done = run_suite("--allow-cpu", "--quick", "--only", "bench-documents", "--out", str(results), timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert step_rows(results)["bench-documents"][:2] == ["PASS", "0"]
    summary = (results / "SUMMARY.md").read_text()
    assert "### documents-cpu-" in summary
    for run in ("glmrt parse, single concurrency", "glmrt parse, full throughput",
                "glmocr SDK -> glmrt serve, single concurrency", "glmocr SDK -> glmrt serve, full throughput"):
        assert f"| {run} | 4 |" in summary
