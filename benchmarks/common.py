"""What every benchmark shares: the run's metadata (device, versions, commit), where its results
go and how they are written, and the key numbers that benchmarks/gpu_suite.sh quotes from them.

    python benchmarks/common.py summary DIR   # markdown of the key numbers of DIR's result JSONs
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# The tests' helpers (glmrt_testing: checkpoint builders, generated documents) are imported from
# tests/support; the repository root is never put on sys.path (its kernels/ folder would shadow the
# Hub's `kernels` package that transformers imports), so glmrt is always the installed package.
SUPPORT = REPO / "tests" / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))


def device_info() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return dict(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return dict(name=f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)",
                cores=os.cpu_count())


def git_state() -> dict:
    """The checkout's commit and whether it has uncommitted changes outside benchmarks/results
    (results are outputs, not code). A copy of the tree without git metadata (or without git)
    gives commit $GLMRT_GIT_COMMIT, else None, and dirty None."""
    def git(*args: str) -> str | None:
        # safe.directory: the copy may belong to another user than the one running (root on a GPU box)
        command = ["git", "-c", "safe.directory=*", "-C", str(REPO), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError:  # no git binary
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return dict(commit=os.environ.get("GLMRT_GIT_COMMIT"), dirty=None)
    return dict(commit=commit, dirty=bool(git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")))


def _version(distribution: str) -> str | None:
    """Installed version, read from package metadata without importing the package."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(**extra: object) -> dict:
    """Everything a result file records about its run: UTC timestamp, device, host CPU, versions,
    commit; `extra` holds the benchmark's own settings (dtype, smoke, ...)."""
    return dict(timestamp=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                device=device_info(),
                host=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
                python=platform.python_version(), torch=torch.__version__,
                triton=_version("triton"), transformers=_version("transformers"),
                **git_state(), **extra)


def provenance(meta: dict) -> str:
    """One markdown bullet: commit (and dirty state), versions."""
    dirty = {True: " (dirty tree)", False: "", None: " (dirty state unknown)"}[meta["dirty"]]
    return (f"- commit `{meta['commit']}`{dirty}, python {meta['python']}, torch {meta['torch']}, "
            f"triton {meta['triton']}, transformers {meta['transformers']}")


def output_dir(out: Path | None, smoke: bool) -> Path:
    """--out if given; else a fresh temp folder for smoke runs (their numbers mean nothing) and
    benchmarks/results for real ones."""
    if out is not None:
        return out
    return Path(tempfile.mkdtemp(prefix="glmrt-bench-")) if smoke else RESULTS


CUDA = torch.cuda.is_available()
# Set by benchmarks/suite.py: a JSON-lines file to which key_row() appends every row it makes.
KEY_ROWS_ENV = "GLMRT_KEY_ROWS"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    """(seconds, fn()) with the device drained before and after."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def copy_bandwidth_gbps() -> float:
    """This machine's device memory bandwidth: a device-to-device copy of 2 GiB (64 MiB on a CPU),
    bytes read + bytes written, best of 5. Every hardware floor divides by this."""
    device = "cuda" if CUDA else "cpu"
    n = 2 << 30 if CUDA else 64 << 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src))[0] for _ in range(5))
    return 2 * n / best / 1e9


def floor_ms(nbytes: float, bandwidth_gbps: float) -> float:
    """Milliseconds to read `nbytes` once at `bandwidth_gbps`: the floor of a memory-bound step."""
    return nbytes / (bandwidth_gbps * 1e9) * 1e3


def key_row(metric: str, unit: str, glmrt: float, *, better: str = "lower", peer: float | None = None,
            peer_name: str | None = None, floors: dict[str, float] | None = None) -> dict:
    """One key number of the GPU suite (key.json's "key_numbers"): glmrt's value, its peer's from
    the same run on the same device, and the hardware floors, all in `unit`. `floors` maps what a
    floor counts ("weights", "weights + KV": the bytes a step must read, over the measured copy
    bandwidth) to its value. `better` says which way is good ("lower" for times, "higher" for
    rates); vs_peer and pct are oriented so that > 1 (> 100%) means glmrt is ahead of the peer
    (past the floor, which cannot happen)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    ahead = (lambda other: other / glmrt) if better == "lower" else (lambda other: glmrt / other)
    row = dict(metric=metric, unit=unit, glmrt=glmrt, better=better)
    if peer is not None:
        row.update(peer=peer, peer_name=peer_name, vs_peer=ahead(peer))
    if floors:
        row["floors"] = [dict(basis=basis, value=value, pct=100 * ahead(value)) for basis, value in floors.items()]
    if os.environ.get(KEY_ROWS_ENV):  # the suite keeps each row as it is made: a step cut off by
        with open(os.environ[KEY_ROWS_ENV], "a") as f:  # its timeout still returns what it measured
            f.write(json.dumps(row) + "\n")
    return row


def write_report(out: Path, benchmark: str, meta: dict, results: dict,
                 markdown: list[str]) -> tuple[Path, Path]:
    """Writes <out>/<benchmark>-<device>-<timestamp>.json ({**meta, **results}) and the same
    name .md (the markdown lines), says where; returns both paths. results["key"], a list of
    key_row()s, holds the numbers the GPU suite collects into key.json."""
    name = meta["device"]["name"].lower() if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    stem = out / f"{benchmark}-{slug}-{meta['timestamp']}"
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps({**meta, **results}, indent=2) + "\n")
    md_path.write_text("\n".join(markdown) + "\n")
    print(f"wrote {json_path}\nwrote {md_path}")
    return json_path, md_path


# ----------------------------------------------------------------------------- suite summary


def _kernels_numbers(data: dict) -> list[str]:
    peaks, cases = data["peaks"], data["cases"]
    status = [c["status"] for c in cases]
    bad = [f"{c['kernel']} {c['case']}" for c in cases if c["check"] != "ok"]
    missed = [f"{c['kernel']} {c['case']} ({c['peak_pct']:.0f}% < {c['target_pct']:.0f}%)"
              for c in cases if c["status"] == "MISS"]
    lines = [f"- measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, "
             f"matmul {peaks['matmul_tflops']:.4g} TFLOP/s",
             f"- {len(cases)} cases: {status.count('PASS')} PASS, {status.count('MISS')} MISS "
             f"against their targets; {len(bad)} failed their correctness check or raised"]
    lines += [f"  - check failed: {name}" for name in bad]
    lines += [f"  - target missed: {name}" for name in missed]
    return lines


def _e2e_numbers(data: dict) -> list[str]:
    memory, trace = data["memory"], data["trace"]
    free = ("no GPU" if memory["free_gib"] is None
            else f"{memory['free_gib']:.1f} of {memory['total_gib']:.1f} GiB of GPU memory free")
    if memory.get("graph_gib") is not None:  # results from before 2026-12-07 have no graph_gib
        free += f"; the CUDA graphs keep {memory['graph_gib']:.2f} GiB"
    if memory.get("runner_gib") is not None:  # measured before the KV cache is sized, since 2026-12-07
        free += (f"; the KV budget left {memory['runner_gib']:.2f} GiB for what the runner keeps beside its cache "
                 "(graphs, batch state)")
    lines = [f"- backend {data['backend']}, CUDA graphs {data['cuda_graphs']}, copy bandwidth "
             f"{data['copy_bandwidth_gbps']:.0f} GB/s; decoder weights {data['decoder_weight_bytes'] / 1e9:.3f} GB "
             f"(floor {data['hbm_floor_ms_per_token']:.3f} ms/step), KV cache "
             f"{data['kv_bytes_per_token'] / 1024:.3g} KiB/token",
             f"- after engine start: {free}; KV cache {memory['kv_cache_tokens']} tokens "
             f"({memory['kv_cache_gib']:.2f} GiB, gpu_memory_utilization {memory['gpu_memory_utilization']})"]
    if data["decode_device_ops"] is not None:
        lines.append(f"- device ops per batch-1 decode step: {data['decode_device_ops']} "
                     f"({data['decoder_layer_device_ops']} per decoder layer, {data['decoder_layers']} layers; "
                     "target <= 7 per layer)")
    lines += ["", "| metric | glmrt | transformers | speed-up | % of floor (weights + KV) | % of weights floor |",
              "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        pcts = [f"{r[k]:.0f}%" if k in r else "-" for k in ("pct_of_floor", "pct_of_weights_floor")]
        theirs, speedup = ("out of memory", "-") if r["transformers"] is None else (
            f"{r['transformers']:.4g}", f"{r['speedup']:.2f}x")
        lines.append(f"| {r['metric']} | {r['glmrt']:.4g} | {theirs} | {speedup} | {pcts[0]} | {pcts[1]} |")
    if trace is None:
        return lines + ["", f"- decode graph replay trace: none ({data['trace_absent']})"]
    lines += ["", f"- decode graph replay, batch 1, context {trace['context']}: {trace['device_ops']} device ops, "
              f"{trace['kernel_us']:.1f} us of kernel time in {trace['wall_us']:.1f} us on the device "
              f"({trace['wall_us'] - trace['kernel_us']:.1f} us of gaps)", "",
              "| op (10 longest in total) | count | total us |", "|---|---|---|"]
    return lines + [f"| `{t['name'][:100].replace('|', '/')}` | {t['count']} | {t['total_us']:.1f} |"
                    for t in trace["top"]]


def _patchify_numbers(data: dict) -> list[str]:
    cpp = "not built" if data["cpp_best_ms"] is None else f"{data['cpp_best_ms']:.2f} ms"
    return [f"- {data['patches']} patches: numpy {data['numpy_best_ms']:.2f} ms, C++ {cpp} (best of "
            f"{data['repeats']}); ImageProcessor end to end {data['processor_best_ms']:.2f} ms"]


def _host_overhead_numbers(data: dict) -> list[str]:
    lines = [f"- decode, batch {r['batch']}, history {r['history_tokens']}: {r['median_us']:.0f} us/step (median)"
             for r in data["decode"]]
    p = data["prefill"]
    return lines + [f"- prefill of {p['crops']} crops: {p['prefill_step_median_us']:.0f} us engine step, "
                    f"{p['preprocess_median_ms']:.1f} ms preprocessing"]


def _serve_numbers(data: dict) -> list[str]:
    started = f"; the server answered after {data['server_start_s']:.1f} s" if "server_start_s" in data else ""
    lines = [f"- {data['checkpoint']}, {len(data['regions'])} region requests, "
             f"{data['preemptions']} preemptions{started}",
             "", "| run | concurrency | req/s | output tok/s | TTFT p50/p99 ms | latency p50/p99 ms |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['run']} | {r['concurrency']} | {r['requests_per_s']:.3g} | {r['output_tokens_per_s']:.4g} | "
                     f"{r['ttft_p50_ms']:.4g} / {r['ttft_p99_ms']:.4g} | "
                     f"{r['latency_p50_ms']:.4g} / {r['latency_p99_ms']:.4g} |")
    if data["ratios"]:
        lines.append("")
    lines += [f"- glmrt / transformers, {r['comparison']}: {r['output_tokens_per_s']:.2f}x tokens/s, "
              f"{r['latency_p50']:.2f}x p50 latency" for r in data["ratios"]]
    return lines


def _structured_numbers(data: dict) -> list[str]:
    def rows(r: dict) -> str:
        return f"batch {r['batch']}, {r['constrained_rows']} json_schema row(s)"

    host = {r["batch"]: r["mean_us"] for r in data["host"] if not r["constrained_rows"]}
    device = {r["batch"]: r["median_ms"] for r in data["device_steps"] if not r["constrained_rows"]}
    lines = [f"- host, {rows(r)}: {r['mean_us']:.0f} us/step ({r['mean_us'] - host[r['batch']]:+.0f} us; "
             f"masks {r['masks_us']:.0f} us)" for r in data["host"]]
    return lines + [f"- device, {rows(r)}: {r['median_ms']:.3f} ms/step ({r['median_ms'] - device[r['batch']]:+.3f} ms)"
                    for r in data["device_steps"]]


def _spec_decode_numbers(data: dict) -> list[str]:
    return [f"- k {r['k']}, batch {r['batch']}, context {r['context']}, draft accuracy {r['draft_accuracy']:.2f}: "
            f"{r['ms_per_step']:.3f} ms/step, {r['tokens_per_s']:.4g} tok/s = {r['speedup']:.2f}x plain "
            f"({r['plain_tokens_per_s']:.4g}); acceptance {r['acceptance']:.2f}, "
            f"{r['mean_accepted_length']:.2f} tokens/step" for r in data["rows"]]


def _documents_numbers(data: dict) -> list[str]:
    started = ([f"- glmrt parse's engine started in {data['engine_start_s']:.1f} s, its warm-up document took "
                f"{data['warm_up_s']:.1f} s"] if "engine_start_s" in data else [])
    lines = [f"- {data['documents']} PDFs x {data['pages_per_document']} pages, {data['tokens_per_region']} "
             f"tokens per region, {data['model']}" + (f"; {data['sdk_note']}" if data.get("sdk_note") else ""),
             *started]
    if data["rows"]:  # none with --reader
        lines += ["", "| run | pages | regions | tokens/page | pages/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['pages']} | {r['regions']} | {r['tokens_per_page']:.0f} | {r['pages_per_s']:.3g} |"
                  for r in data["rows"]]
    lines += [f"- {r['comparison']}: {r['pages_per_s']:.2f}x pages/s" for r in data["ratios"]]
    if data.get("draft_rows"):
        lines += ["", "| --draft | PDFs | pages/s | mean accepted tokens/step | decode steps/page | tokens/page |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['draft']} | {r['kind']} | {r['pages_per_s']:.3g} | {r['mean_accepted_length']:.2f} | "
                  f"{r['decode_steps_per_page']:.1f} | {r['tokens_per_page']:.0f} |" for r in data["draft_rows"]]
    return lines


def _capacity_numbers(data: dict) -> list[str]:
    return [f"- render {data['render_text_pages_per_s']:.3g} / {data['render_scanned_pages_per_s']:.3g} pages/s per core "
            f"(text / scanned PDFs), layout {data['layout_pages_per_s']:.3g} pages/s, recognition "
            f"{data['recognition_pages_per_s']:.3g} pages/s ({data['recognition_source']}): one GPU "
            f"{data['gpu_pages_per_s']:.3g} pages/s"]


def _glm_image_numbers(data: dict) -> list[str]:
    lines = [f"- weights floor {data['hbm_floor_ms_per_token']:.3f} ms/step; a whole {data['image_size']}² image "
             f"({data['image_tokens']} tokens) in {data['image_seconds']:.2f} s at batch 1 ({data['image_seconds_how']})"]
    lines += [f"- batch {r['batch']}: glmrt {r['glmrt_tokens_per_s']:.4g} tok/s, transformers "
              f"{r['transformers_tokens_per_s']:.4g} tok/s ({r['speedup']:.2f}x), {r['pct_of_floor']:.0f}% of "
              f"the floor ({r['floor_basis']})" for r in data["rows"]]
    return lines + [f"- pictures, batch {r['batch']}, {r['steps']} diffusion steps: glmrt {r['glmrt_s_per_picture']:.3g} "
                    f"s/picture ({r['ar_share'] * 100:.0f}% AR stage), diffusers {r['diffusers_s_per_picture']:.3g} "
                    f"({r['speedup']:.2f}x)" for r in data.get("pictures", [])]


SUMMARIZERS = {"kernels": _kernels_numbers, "e2e": _e2e_numbers, "patchify": _patchify_numbers,
               "host_overhead": _host_overhead_numbers, "serve": _serve_numbers, "structured": _structured_numbers,
               "spec_decode": _spec_decode_numbers, "documents": _documents_numbers, "drafts": _documents_numbers,
               "capacity": _capacity_numbers, "glm_image": _glm_image_numbers}


def key_numbers(folder: Path) -> list[str]:
    """Markdown quoting the key numbers of every result JSON in `folder`: one section per file.
    A file of another benchmark, or one whose fields are not as expected, is only named."""
    lines = []
    for path in sorted(folder.glob("*.json")):
        lines += ["", f"### {path.name}", ""]
        summarize = SUMMARIZERS.get(path.name.split("-", 1)[0])
        try:
            lines += summarize(json.loads(path.read_text())) if summarize else ["- (see the file)"]
        except (KeyError, TypeError, ValueError) as exc:
            lines.append(f"- could not read its key numbers ({type(exc).__name__}: {exc})")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "summary":
        sys.exit("usage: python benchmarks/common.py summary DIR")
    print("\n".join(key_numbers(Path(sys.argv[2]))))
