"""Host overhead of the engine: microseconds of Python work per decode step and per prefill, with
the device work replaced by a stub that costs nothing.

What is measured is everything the host does around a step: scheduling, block bookkeeping, the
uploads it prepares (new block ids, admitted rows), reading the sampled tokens back, stop checks,
incremental detokenization and building the outputs. The decoder, the vision tower, lm_head and
the sampler are stubbed (they run on the device, overlapped with this host work), so the numbers
are the same on a CPU-only machine as on a GPU host, and they show whether the host keeps up with
the device: at batch 1 an H100 decode step of GLM-OCR is ~0.4-0.5 ms.

Cases: decode steps at batch 1, 8, 32 and 128, each at a short and a long history (64 and 3,500
prompt tokens, repetition penalty 1.1 as the glmocr SDK sends), and a prefill of 32 region crops
prepared together, as LLM.generate and glmrt parse's pages prepare them (the engine's step, and the
crops' preprocessing on the worker pool beside it), and mixed steps:
31 sequences decoding while 4,000-token prompts are prefilled beside them in 2048-token steps;
and the cost of a step by output length: 32 sequences at ~100 and at ~4,000 generated tokens
(host work per step must not grow with the output). Requests get an output every step (streaming,
the server's), and, at batch 32 and in the mixed steps, also only a final one (output_kind
"final_only": LLM.generate and glmrt parse); a commit without output kinds runs those cases
streaming, as its LLM.generate did.

    python benchmarks/host_overhead.py [--steps N] [--out DIR] [--smoke] [--baseline REV [--rounds N]]

--baseline REV runs the same cases on the glmrt of commit REV too (checked out in a temporary git
worktree, imported in a child process), alternating REV and this checkout `--rounds` times and
keeping each case's best round, and reports the two side by side with their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, metadata, output_dir, provenance, write_report  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.helpers import make_image  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

TARGET_US = {1: 150, 32: 500}  # issue targets on the development machine
# Targets against a --baseline commit: this checkout's time over the baseline's at most this.
TARGET_RATIO = {"decode batch 32": 0.6, "mixed step": 1 / 3, "prefill of 32 crops": 1 / 3}
TEXT_TOKENS = torch.arange(300, 364)  # byte-level ids of ordinary characters: real detokenization work


class StubDevice:
    """Stands in for the device work of a step: forward, vision (with the pixels' normalization),
    lm_head, sampler, and the step inputs and state the device makes in one op each (one Triton
    launch on the GPU, where the CPU backend's twins are several torch ops): the decode rows'
    inputs of a mixed step, a prefill's KV slots and the batch rows of admitted sequences (commits
    before those ops launched the torch ops from the runner, or built the slots on the host, and
    keep that work; the host's part of admission, its one upload, is measured). Tokens cycle
    through ordinary text ids so that detokenization does its usual work; under a structured-output
    mask, a row takes a pseudo-random allowed token instead (that choice is the stub's own work:
    `seconds` accumulates it, for callers to subtract)."""

    def __init__(self, engine: LLMEngine):
        runner, model = engine.runner, engine.model
        self.step = 0
        self.seconds = 0.0
        hidden = model.config.text.hidden_size
        model.forward = lambda input_ids, *a, **k: torch.empty(input_ids.shape[0], hidden)
        runner.normalize_pixels = lambda pixels: pixels
        model.encode_images = lambda pixels, grids: torch.zeros(
            sum(t * h * w for t, h, w in grids) // 4, hidden)
        model.compute_logits = lambda h: h[:, :1]
        runner.sampler = self.sample
        ops = getattr(getattr(runner, "batch", None), "ops", None)
        if hasattr(ops, "decode_inputs"):  # (slot mapping [B], positions [3, B]) of B rows
            ops.decode_inputs = lambda context_lens, *a, **k: (
                torch.zeros(len(context_lens), dtype=torch.int64), torch.zeros(3, len(context_lens), dtype=torch.int64))
        # (tokens, the logits they came from): what a decode step returns (tokens alone before the
        # runner computed log-probabilities, 2026-12-06: so that --baseline measures older commits)
        if hasattr(runner, "logprobs_of"):
            runner.decode_step = lambda bs, do_sample: (self.sample(None, slice(0, bs), do_sample), torch.zeros(bs, 1))
        else:
            runner.decode_step = lambda bs, do_sample: self.sample(None, slice(0, bs), do_sample)
        runner.decode_logits = lambda bs: torch.zeros(bs, 1)  # the forward half of a step
        if hasattr(ops, "prefill_slots"):  # [T] slots of a prefill's tokens
            ops.prefill_slots = lambda cu_seqlens, starts, tables, block_size, n: torch.zeros(n, dtype=torch.int64)
        if hasattr(ops, "admit_rows"):  # the batch rows of sequences admitted after their prefill
            ops.admit_rows = lambda *args: None
        self.batch = getattr(runner, "batch", None)
        if hasattr(runner, "sample_rows"):  # the sampling half (a graph on the GPU), under the step's masks
            def sample_rows(logits, bs, do_sample, masked=True):
                if not getattr(self.batch, "_masked_rows", 1):  # all ones: no row is constrained
                    return self.sample(None, slice(0, bs), do_sample)
                masks = self.batch.token_masks[:bs]
                return self.sample(None, slice(0, bs), do_sample, masks[:, 0] if masks.dim() == 3 else masks)
            runner.sample_rows = sample_rows

    def sample(self, logits, rows: slice, do_sample: bool, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.step += 1
        n = rows.stop - rows.start
        tokens = TEXT_TOKENS[(torch.arange(n) + self.step) % len(TEXT_TOKENS)]
        if token_mask is not None:
            start = time.perf_counter()
            words = token_mask[:n].numpy()
            for i in range(n):
                if (words[i] == -1).all():  # no constraint on this row
                    continue
                nonzero = np.flatnonzero(words[i])  # words with an allowed token
                w = int(nonzero[(self.step * 7919 + i * 104729) % len(nonzero)])
                bits = [b for b in range(32) if (int(words[i, w]) >> b) & 1]
                tokens[i] = 32 * w + bits[(self.step + i) % len(bits)]
            self.seconds += time.perf_counter() - start
        return tokens


def sampling_params(final_only: bool, **options) -> glmrt.SamplingParams:
    """SamplingParams(**options), with output_kind "final_only" if asked: what LLM.generate and glmrt
    parse use (a commit from before 2026-12-07 has no output kinds: it makes every step's outputs)."""
    if final_only and "output_kind" in glmrt.SamplingParams.__dataclass_fields__:
        options["output_kind"] = "final_only"
    return glmrt.SamplingParams(**options)


def decode_case(path: Path, batch: int, prompt_tokens: int, steps: int, final_only: bool = False) -> dict:
    context = prompt_tokens + steps + 64
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=batch,
                       max_model_len=context, kv_cache_tokens=batch * context, max_num_batched_tokens=batch * context)
    StubDevice(engine)
    prompt = "x" * (prompt_tokens - 16)  # one byte-level token per character, plus the template
    params = sampling_params(final_only, max_tokens=steps + 8, ignore_eos=True, repetition_penalty=1.1)
    for _ in range(batch):
        engine.add_request({"prompt": prompt, "images": []}, params)
    engine.step()  # prefill of the whole batch in one step
    engine.step()  # first decode (the prefill's tokens are read here)
    assert len(engine.scheduler.running) == batch
    running, times = engine.scheduler.running, []
    for i in range(steps):
        before = running[0].num_tokens
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        assert len(running) == batch and all(seq.num_tokens == before + 1 for seq in running), \
            "every sequence must advance each step"
    return dict(batch=batch, history_tokens=running[0].num_tokens, steps=steps, final_only=final_only,
                median_us=statistics.median(times) * 1e6, p90_us=sorted(times)[int(0.9 * len(times))] * 1e6)


def reserved(seq) -> int:
    """Cache slots its launched steps reserved (Sequence.num_reserved; num_cached before 2026-12-06),
    so that --baseline can measure older commits too."""
    return seq.num_reserved if hasattr(seq, "num_reserved") else seq.num_cached


def output_length_case(path: Path, batch: int, lengths: tuple[int, ...], window: int) -> dict:
    """`batch` sequences generating max(lengths) tokens: the host time per step over the `window`
    steps that end at each output length."""
    prompt_tokens = 64
    context = prompt_tokens + max(lengths) + 16
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=batch,
                       max_model_len=context, kv_cache_tokens=batch * context, max_num_batched_tokens=batch * context)
    StubDevice(engine)
    params = glmrt.SamplingParams(max_tokens=max(lengths), ignore_eos=True, repetition_penalty=1.1)
    for _ in range(batch):
        engine.add_request({"prompt": "x" * (prompt_tokens - 16), "images": []}, params)
    engine.step()
    times = []
    for _ in range(max(lengths) - 1):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)  # times[i]: the step that reads output token i + 1
    return dict(batch=batch, window=window, median_us={
        n: statistics.median(times[n - window: n]) * 1e6 for n in lengths})


def mixed_case(path: Path, batch: int, prompt_tokens: int, budget: int, steps: int, final_only: bool = False) -> dict:
    """`batch` sequences decoding while long prompts arrive one after another: the host time of
    the mixed steps (the decode rows + a prefill chunk of the rest of the step's token budget).
    The prompts are prepared before the timed steps, as the async engine's worker threads prepare
    requests beside the running steps: preparing one on this thread right before a step left that
    step's caches cold (until 2026-12-07: its first-chunk steps ran ~50 us slower than its
    last-chunk steps, and the median of the two modes moved by ~10% between runs)."""
    context = prompt_tokens + 64
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=batch + 1,
                       max_model_len=context, kv_cache_tokens=(batch + 1) * context, max_num_batched_tokens=budget)
    StubDevice(engine)
    params = sampling_params(final_only, max_tokens=10_000, ignore_eos=True, repetition_penalty=1.1)
    for _ in range(batch):
        engine.add_request({"prompt": "x" * 48, "images": []}, params)
    engine.step()
    long_prompt = {"prompt": "x" * (prompt_tokens - 16), "images": []}
    prepared = [engine.prepare(long_prompt, glmrt.SamplingParams(max_tokens=1)) for _ in range(steps)]
    times, chunks = [], []
    for seq in prepared:  # each runs at least one chunk
        if len(times) >= steps:
            break
        engine.enqueue(seq)
        while engine.has_request(seq.request_id):
            before = reserved(seq)
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if reserved(seq) > before:  # this step ran one of its chunks beside the decode rows
                times.append(elapsed)
                chunks.append(reserved(seq) - before)
    return dict(batch=batch, prompt_tokens=prompt_tokens, steps=len(times), final_only=final_only,
                median_chunk_tokens=statistics.median(chunks),
                median_us=statistics.median(times) * 1e6, budget=engine.max_num_batched_tokens)


def prefill_case(path: Path, crops: int, repeats: int) -> dict:
    engine = LLMEngine(str(path), device="cpu", dtype="float32", backend="torch", max_num_seqs=crops)
    StubDevice(engine)
    images = [make_image(300 + 7 * i, 120 + 3 * i, i) for i in range(crops)]  # region-crop sizes
    params = glmrt.SamplingParams(max_tokens=4, repetition_penalty=1.1)
    prep, step = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        seqs = engine.prepare_many([{"prompt": "Text Recognition:", "images": [im]} for im in images],
                                   [params] * len(images))
        pixel_mb = sum(s.pixel_values.nbytes for s in seqs) / 1e6
        prep.append(time.perf_counter() - start)
        for seq in seqs:
            engine.enqueue(seq)
        start = time.perf_counter()
        engine.step()
        step.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
    tokens = sum(len(s.prompt_token_ids) for s in seqs)
    return dict(crops=crops, prompt_tokens=tokens, pixel_mb=pixel_mb, repeats=repeats, prefill_step_median_us=statistics.median(step) * 1e6,
                preprocess_median_ms=statistics.median(prep) * 1e3)


def measure(steps: int, smoke: bool) -> dict:
    """Every case on the glmrt this process imports."""
    batches, histories, crops = ([1, 8, 32, 128], [64, 3500], 32)
    if smoke:
        batches, histories, steps, crops = [1, 8], [64], 10, 4
    path = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="glmrt-host-")))
    torch.set_num_threads(1)  # host work is single-threaded; keep the numbers steady
    decode = []
    for history in histories:
        for batch in batches:
            row = decode_case(path, batch, history, steps)
            decode.append(row)
            print(f"decode batch {batch:4d}, history {row['history_tokens']:5d}: "
                  f"median {row['median_us']:7.1f} us/step, p90 {row['p90_us']:7.1f}")
        final_batch = batches[-1] if smoke else 32
        row = decode_case(path, final_batch, history, steps, final_only=True)
        decode.append(row)
        print(f"decode batch {final_batch:4d}, history {row['history_tokens']:5d}, final only: "
              f"median {row['median_us']:7.1f} us/step, p90 {row['p90_us']:7.1f}")
    outputs = output_length_case(path, 4, (20, 60), 10) if smoke else output_length_case(path, 32, (100, 4000), 100)
    print("output length: " + ", ".join(f"{n} tokens {us:.0f} us/step" for n, us in outputs["median_us"].items()))
    # the tiny checkpoint's context is 4096 tokens: 4000-token prompts in chunks of vLLM's 2048-token server budget
    mixed = {}
    for final_only in (False, True):
        mixed[final_only] = row = (mixed_case(path, 3, 300, 128, 2, final_only) if smoke
                                   else mixed_case(path, 31, 4000, 2048, 20, final_only))
        print(f"mixed step, {row['batch']} decoding + a {row['median_chunk_tokens']:.0f}-token chunk"
              f"{', final only' * final_only}: median {row['median_us']:.0f} us/step")
    prefill = prefill_case(path, crops, 3 if smoke else 10)
    print(f"prefill of {crops} crops ({prefill['prompt_tokens']} tokens): engine step "
          f"{prefill['prefill_step_median_us']:.0f} us; preprocessing {prefill['preprocess_median_ms']:.1f} ms")
    return dict(decode=decode, outputs=outputs, mixed=mixed[False], mixed_final_only=mixed[True], prefill=prefill,
                glmrt=str(Path(glmrt.__file__).parent))


def measure_in_child(rev: str | None, steps: int, smoke: bool) -> dict:
    """`measure` in a child process, on this checkout (rev None) or on commit `rev`: a temporary
    worktree whose runtime/ is put first on the child's path as `glmrt` (kernels/ linked in as
    glmrt.kernels, the package layout of pyproject.toml; this checkout's built glmrt._C copied)."""
    with tempfile.TemporaryDirectory(prefix="glmrt-host-") as tmp:
        tmp, env = Path(tmp), dict(os.environ)
        tree = tmp / "tree"
        if rev is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            if rev is not None:
                (tree / "runtime" / "kernels").symlink_to(tree / "kernels")
                for extension in (REPO / "runtime").glob("_C*.so"):
                    shutil.copy(extension, tree / "runtime")
                (tmp / "path").mkdir()
                (tmp / "path" / "glmrt").symlink_to(tree / "runtime")
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp / "path"), env.get("PYTHONPATH")]))
            result = tmp / "result.json"
            command = [sys.executable, __file__, "--json", str(result), "--steps", str(steps)] + ["--smoke"] * smoke
            subprocess.run(command, env=env, check=True)
            data = json.loads(result.read_text())
            expected = tree / "runtime" if rev is not None else REPO / "runtime"
            if Path(data["glmrt"]).resolve() != expected.resolve():
                raise RuntimeError(f"the child imported glmrt from {data['glmrt']}, not {expected}")
        finally:
            if rev is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    return data


def _cases(data: dict) -> dict[str, float]:
    """The side-by-side numbers of one run: case name -> us."""
    cases = {f"decode batch {r['batch']}, history {r['history_tokens']}{', final only' * r['final_only']}":
             r["median_us"] for r in data["decode"]}
    cases.update({f"output length {n}, batch {data['outputs']['batch']}": us
                  for n, us in data["outputs"]["median_us"].items()})
    cases["mixed step"] = data["mixed"]["median_us"]
    cases["mixed step, final only"] = data["mixed_final_only"]["median_us"]
    cases[f"prefill of {data['prefill']['crops']} crops"] = data["prefill"]["prefill_step_median_us"]
    return cases


def side_by_side(rev: str, rounds: int, steps: int, smoke: bool) -> tuple[dict, list[str]]:
    """Alternates the baseline and this checkout `rounds` times; each case's best round (the least
    disturbed by other work on the machine) -> (results, markdown lines)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    for _ in range(rounds):
        runs["baseline"].append(_cases(measure_in_child(commit, steps, smoke)))
        runs["this"].append(_cases(measure_in_child(None, steps, smoke)))
    best = {side: {case: min(run[case] for run in side_runs) for case in side_runs[0]}
            for side, side_runs in runs.items()}
    lines = [f"## Side by side with commit `{commit}` (best of {rounds} alternating rounds)", "",
             "| case | baseline us/step | this checkout us/step | ratio | target |", "|---|---|---|---|---|"]
    rows = []
    for case, base in best["baseline"].items():
        now = best["this"].get(case)
        if now is None:
            continue
        ratio = now / base
        target = next((t for prefix, t in TARGET_RATIO.items() if case.startswith(prefix)), None)
        verdict = "-" if target is None else f"<= {target:.2f} ({'PASS' if ratio <= target else 'MISS'})"
        lines.append(f"| {case} | {base:.0f} | {now:.0f} | {ratio:.2f} | {verdict} |")
        rows.append(dict(case=case, baseline_us=base, this_us=now, ratio=ratio, target=target))
    return dict(baseline_commit=commit, rounds=rounds, side_by_side=rows, runs=runs), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per case")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="few steps, small batches: checks the script works")
    parser.add_argument("--baseline", metavar="REV", help="also measure commit REV, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline: alternating rounds per side")
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # a child of --baseline: raw results only
    args = parser.parse_args(argv)
    if args.json is not None:
        args.json.write_text(json.dumps(measure(args.steps, args.smoke)))
        return 0
    compared, compared_lines = {}, []
    if args.baseline is not None:
        compared, compared_lines = side_by_side(args.baseline, args.rounds, args.steps, args.smoke)
        data = measure_in_child(None, args.steps, args.smoke)
    else:
        data = measure(args.steps, args.smoke)
    decode, outputs, mixed, prefill = data["decode"], data["outputs"], data["mixed"], data["prefill"]
    crops = prefill["crops"]

    meta = metadata(smoke=args.smoke, torch_threads=1)
    lines = [f"# host overhead per engine step, device work stubbed, on {meta['host']['cpu']} "
             f"({meta['host']['cores']} cores)", "", provenance(meta), "",
             "| batch | history tokens | outputs | median us/step | p90 us/step | target |", "|---|---|---|---|---|---|"]
    for r in decode:
        target = TARGET_US.get(r["batch"])
        verdict = "-" if target is None else f"<= {target} ({'PASS' if r['median_us'] <= target else 'MISS'})"
        kind = "final only" if r["final_only"] else "every step"
        lines.append(f"| {r['batch']} | {r['history_tokens']} | {kind} | {r['median_us']:.0f} | {r['p90_us']:.0f} "
                     f"| {verdict} |")
    by_length = ", ".join(f"{us:.0f} us/step at {n} tokens" for n, us in outputs["median_us"].items())
    lines += ["", f"By output length ({outputs['batch']} sequences, median of the {outputs['window']} steps up to "
              f"each length): {by_length}."]
    lines += ["", f"Mixed step (chunked prefill): {mixed['batch']} sequences decoding while {mixed['prompt_tokens']}-token "
              f"prompts arrive, each prefilled in chunks of the {mixed['budget']}-token budget beside the decode rows: "
              f"{mixed['median_us']:.0f} us of host work per step (median over {mixed['steps']} steps, chunks of "
              f"{mixed['median_chunk_tokens']:.0f} tokens); {data['mixed_final_only']['median_us']:.0f} us when the "
              "requests' outputs are final only."]
    lines += ["", f"Prefill of {crops} region crops ({prefill['prompt_tokens']} prompt tokens): engine step "
              f"{prefill['prefill_step_median_us']:.0f} us (host side of the step; the crops' {prefill['pixel_mb']:.1f} MB "
              "of uint8 patch pixels are normalized on the device, and since 2026-12-07 crops prepared together "
              "share one buffer that the step takes as it is, where older commits concatenated them in the step); "
              f"preprocessing on the worker pool {prefill['preprocess_median_ms']:.1f} ms (overlaps running steps in "
              "the async engine)."]
    if compared_lines:
        lines += [""] + compared_lines
    write_report(output_dir(args.out, args.smoke), "host_overhead", meta,
                 dict(decode=decode, outputs=outputs, mixed=mixed, mixed_final_only=data["mixed_final_only"],
                      prefill=prefill, **compared), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
