"""benchmarks/gpu_suite.sh without a GPU: the whole --key suite as a dry run on the CPU (every step,
tiny sizes, the same files), its refusal to run for real without a GPU, and its plumbing: a step
that hangs is cut off while what it measured so far still reaches key.json, key.json is current
while a step runs, a failing step does not stop the next, and the Triton cache survives a round
trip between two machines."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from glmrt_testing import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.sh"
KEY_STEPS = ["install", "checkpoint", "smoke", "decode", "mtp", "structured", "documents", "drafts", "serve",
             "image-checkpoint", "glm-image", "gpu-tests"]
BENCHMARK_STEPS = ["smoke", "decode", "mtp", "structured", "documents", "drafts", "serve", "glm-image"]
FILES = {"key.json", "SUMMARY.md", "logs.tar.gz", "triton-cache.tar.gz"}


def suite_module():
    spec = importlib.util.spec_from_file_location("glmrt_suite", REPO / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_suite(*args: str, python: str = sys.executable, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def listed_steps(stdout: str) -> list[str]:
    return [line.split()[1] for line in stdout.splitlines() if line.split()[0].rstrip(".").isdigit()]


def steps_of(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}


def stand_in_python(tmp_path: Path, script: str, body: str) -> str:
    """A python that runs the shell `body` when its arguments name benchmarks/`script`, else the real one."""
    path = tmp_path / "python"
    path.write_text(f'#!/usr/bin/env bash\nif [[ "$*" == *benchmarks/{script}* ]]; then {body}; fi\n'
                    f'exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def test_list_shows_the_key_plan_in_order(tmp_path):
    done = run_suite("--key", "--list", "--model", "/ckpt/glm-ocr", "--skip", "serve")
    assert done.returncode == 0, done.stderr
    assert listed_steps(done.stdout) == KEY_STEPS
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.split()[0].rstrip(".").isdigit()}
    assert "budget 540 s" in done.stdout
    assert "pip install --no-build-isolation --no-deps -e ." in lines["install"]
    assert "skipped (--model given)" in lines["checkpoint"] and "skipped (--skip)" in lines["serve"]
    assert "benchmarks/e2e.py --model /ckpt/glm-ocr --key" in lines["decode"]
    everything = listed_steps(run_suite("--list").stdout)
    assert everything[:10] == KEY_STEPS[:10] and everything[-1] == "gpu-tests"
    assert {"kernels", "host", "patchify", "capacity"} <= set(everything)


@pytest.mark.parametrize("args, message", [
    (["--key", "--skip", "decode,nope"], "unknown step(s) nope"),
    (["--budget", "0"], "--budget must be a positive number of seconds"),
    (["--triton-cache", "/no/such.tar.gz"], "--triton-cache: no such file"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_are_named(args, message):
    done = run_suite("--list", *args)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_to_run_without_a_gpu(tmp_path):
    done = run_suite("--key", "--out", str(tmp_path / "results"))
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "results").exists()


def test_key_dry_run_runs_every_step_and_writes_the_files(tmp_path):
    """The one-lease suite, every step, on the CPU: each benchmark's key rows, the smoke checks and
    the GPU tests' tally (all skipped here) reach key.json and SUMMARY.md, in four files."""
    out = tmp_path / "out"
    done = run_suite("--key", "--dry-run", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device tool returns at most 8
    report = json.loads((out / "key.json").read_text())
    assert report["overall"] == "PASS" and report["state"] == "finished" and report["dry_run"]
    steps = steps_of(report)
    assert list(steps) == KEY_STEPS
    assert all(s["status"] == "PASS" for s in steps.values()), steps
    rows = report["key_numbers"]
    for step in BENCHMARK_STEPS:
        mine = [r for r in rows if r["step"] == step]
        assert mine, f"no key numbers from {step}"
        assert step in report["results"] and report["results"][step]["key"]
    for row in rows:
        assert {"metric", "unit", "glmrt", "better"} <= set(row) and row["glmrt"] > 0 and not row.get("partial")
        if "peer" in row:
            assert row["peer_name"] and row["vs_peer"] > 0
        for floor in row.get("floors", []):
            assert floor["basis"] in ("weights", "weights + KV") and floor["value"] > 0 and floor["pct"] > 0
    assert any("peer" in r for r in rows)
    assert {f["basis"] for r in rows for f in r.get("floors", [])} == {"weights", "weights + KV"}
    assert report["smoke_checks"] and all(c["ok"] for c in report["smoke_checks"])
    assert report["machine"]["copy_bandwidth_gbps"] > 0
    assert report["gpu_tests"]["counts"].get("skipped", 0) > 0 and not report["gpu_tests"]["failures"]
    summary = (out / "SUMMARY.md").read_text()
    assert "overall: **PASS**" in summary and "dry run on the CPU" in summary
    for step in KEY_STEPS:
        assert f"| {step} | PASS |" in summary
    assert summary.count("\n| decode |") >= 4  # its key rows
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {f"{s}.log" for s in KEY_STEPS} <= set(tar.getnames())
    tarfile.open(out / "triton-cache.tar.gz").close()  # a readable archive (empty: the interpreter compiles nothing)


def test_a_hung_step_is_cut_off_and_keeps_what_it_measured(tmp_path):
    """decode streams two key rows, then hangs: while it runs key.json already says so; at its limit
    it is killed (with its process group), its rows are kept as partial, and the step after it runs."""
    python = stand_in_python(tmp_path, "e2e.py", "exec " + sys.executable + " -c \"import sys, time; "
                             "sys.path.insert(0, 'benchmarks'); from common import key_row; "
                             "key_row('decode ms/token, batch 1', 'ms', 0.5, peer=2.0, peer_name='transformers'); "
                             "key_row('decode ms/step, batch 32', 'ms', 1.5); print('measured', flush=True); "
                             "time.sleep(600)\"")
    out = tmp_path / "out"
    process = subprocess.Popen(["bash", str(SUITE), "--key", "--dry-run", "--model", "/unused", "--budget", "45",
                                "--only", "decode,structured", "--out", str(out)], cwd=REPO,
                               env={**os.environ, "PYTHON": python}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:  # the file is written before the step starts
        try:
            running = json.loads((out / "key.json").read_text())
            if running["state"] == "running decode":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    else:
        pytest.fail("key.json never said the decode step was running")
    assert running["overall"] == "RUNNING" and steps_of(running)["decode"]["status"] == "RUNNING"
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    report = json.loads((out / "key.json").read_text())
    steps = steps_of(report)
    assert steps["decode"]["status"] == "TIMEOUT" and steps["decode"]["seconds"] <= 45
    assert steps["structured"]["status"] in ("SKIPPED", "PASS", "FAIL")  # ran or found the budget spent
    assert "budget spent" in steps["structured"]["note"] or steps["structured"]["seconds"] is not None
    partial = [r for r in report["key_numbers"] if r["step"] == "decode"]
    assert [r["metric"] for r in partial] == ["decode ms/token, batch 1", "decode ms/step, batch 32"]
    assert all(r["partial"] for r in partial) and partial[0]["vs_peer"] == 4.0
    assert "(partial: step cut off)" in (out / "SUMMARY.md").read_text()
    assert "overall: **FAIL**" in (out / "SUMMARY.md").read_text()


def test_a_failing_step_does_not_stop_the_next(tmp_path, tiny_checkpoint):
    # the step after it: mtp, one of the quickest (the dry run's gpu-tests collects every test module)
    python = stand_in_python(tmp_path, "smoke.py", "echo 'smoke broke' >&2; exit 3")
    out = tmp_path / "out"
    done = run_suite("--key", "--dry-run", "--model", str(tiny_checkpoint), "--only", "smoke,mtp",
                     "--out", str(out), python=python, timeout=300)
    assert done.returncode == 1
    steps = steps_of(json.loads((out / "key.json").read_text()))
    assert steps["smoke"]["status"] == "FAIL" and steps["smoke"]["exit"] == 3 and steps["smoke"]["note"] == "smoke broke"
    assert steps["mtp"]["status"] == "PASS"
    assert steps["decode"]["status"] == "SKIPPED" and steps["decode"]["note"] == "not in --only"
    assert steps["gpu-tests"]["status"] == "SKIPPED"
    assert "smoke broke" in done.stdout  # the failing step's tail is printed


KERNEL = """
import triton, triton.language as tl

@triton.jit
def add_one(x, y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i, mask=i < n) + 1, mask=i < n)
"""
COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
from kernel import add_one
source = triton.compiler.ASTSource(fn=add_one, signature={"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                                   constexprs={"BLOCK": 128})
print(len(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]))
"""


def compile_kernel(folder: Path, cache: Path) -> int:
    """Compile the kernel in `folder` for sm_90 with `cache` as Triton's cache -> its cubin's size."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, str(folder)], env={**env, "TRITON_CACHE_DIR": str(cache)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_triton_cache_round_trip(tmp_path):
    """A kernel compiled on one lease, packed (IR texts dropped), restored on the next under another
    path: Triton takes it from the cache (writes nothing new) and gets the same cubin."""
    suite = suite_module()
    (tmp_path / "kernel.py").write_text(KERNEL)
    first = tmp_path / "lease1" / "cache"
    size = compile_kernel(tmp_path, first)
    assert any(first.rglob("*.ptx")) and any(first.rglob("__grp__*.json"))
    note = suite.pack(first, tmp_path / "triton-cache.tar.gz", keep=suite.TRITON_CACHE_KEEP)
    assert note.startswith("3 files")  # the cubin, its metadata and the group file
    shutil.rmtree(tmp_path / "lease1")  # the group file's absolute paths now lead nowhere
    second = tmp_path / "lease2" / "cache"
    assert "1 compiled kernels" in suite.restore_triton_cache(tmp_path / "triton-cache.tar.gz", second)
    before = sorted(p.relative_to(second) for p in second.rglob("*"))
    assert compile_kernel(tmp_path, second) == size
    assert sorted(p.relative_to(second) for p in second.rglob("*")) == before  # a hit: nothing compiled
