"""benchmarks/host_overhead.py, the tool the engine's host-cost targets are shown with, runs every
case (--smoke: small batches, few steps) on the device stub and writes its report."""
import json
import subprocess
import sys

from glmrt_testing import REPO


def test_host_overhead_smoke_runs_every_case(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--smoke", "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [report] = tmp_path.glob("host_overhead-*.json")
    data = json.loads(report.read_text())
    assert {(r["batch"], r["final_only"]) for r in data["decode"]} == {(1, False), (8, False), (8, True)}
    assert all(r["median_us"] > 0 for r in data["decode"]) and set(data["outputs"]["median_us"]) == {"20", "60"}
    for mixed in (data["mixed"], data["mixed_final_only"]):  # each timed step ran a chunk beside 3 decode rows
        assert mixed["batch"] == 3 and mixed["steps"] >= 2 and 0 < mixed["median_chunk_tokens"] <= mixed["budget"]
    assert data["prefill"]["crops"] == 4 and data["prefill"]["prefill_step_median_us"] > 0
    assert (tmp_path / report.name.replace(".json", ".md")).exists()
