"""MTP speculative decoding vs plain decoding, CUDA graphs on both, in one run on one device.

    python benchmarks/spec_decode.py [--model DIR] [--out DIR] [--smoke]

For k = 1..4 speculative tokens and batches 1, 8 and 32 (each request: the same ~1k-token text
prompt, a fixed number of greedy tokens): ms per speculative (draft + verify) step, and decode
tokens/s (a) at full acceptance and (b) at the published acceptance of ~0.75 per draft token,
against plain graph decoding at the same batch. Random weights accept almost nothing, so the
drafts are replaced inside the captured step by an oracle: the greedy continuation, measured
first with plain decoding, with each draft spoiled at a fixed pseudo-random 25% of (position,
index) pairs in (b). The MTP layer still runs in full every step, so the timing is the real
drafter's. Acceptance actually achieved is reported beside each row (in bf16 a batch can
diverge from the batch-1 continuation, which lowers it).

Writes <out>/spec_decode-<device>-<timestamp>.json and .md. `--smoke` runs the tiny test
checkpoint on CPU, eager, with small sizes to prove the code path (numbers meaningless).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import metadata, output_dir, provenance, write_report  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine import spec_decode  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_checkpoint, real_config, tiny_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


class Oracle:
    """Device tensors the captured step reads (set before an engine is built, filled later): the
    continuation, whether to use it, and the share of drafts left correct."""

    def __init__(self, length: int):
        self.tokens = torch.zeros(length, dtype=torch.int64, device=DEVICE)
        self.on = torch.zeros((), dtype=torch.bool, device=DEVICE)
        self.keep = torch.ones((), dtype=torch.float32, device=DEVICE)

    def install(self) -> None:
        """Wrap SpeculativeDecoder.propose: run the MTP drafter, then replace its drafts."""
        propose, oracle = spec_decode.SpeculativeDecoder.propose, self

        def with_oracle(decoder, bs):
            drafts = propose(decoder, bs)
            index = decoder.batch.context_lens[:bs, None].long() + 1 + decoder.positions[:-1]  # [bs, k]
            right = oracle.tokens[index.clamp(max=oracle.tokens.shape[0] - 1)]
            spoil = ((index * 2654435761 + 40503) % 1000).float() >= 1000 * oracle.keep
            right = torch.where(spoil, (right + 1) % decoder.model.config.text.vocab_size, right)
            return torch.where(oracle.on, right, drafts)

        spec_decode.SpeculativeDecoder.propose = with_oracle


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def decode(engine: LLMEngine, prompt: str, batch: int, new_tokens: int) -> tuple[float, int, list[int]]:
    """batch copies of the request; -> (seconds of decode after the first step, steps, tokens of row 0)."""
    params = glmrt.SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request({"prompt": prompt}, params) for _ in range(batch)]
    engine.step()  # the prefill of all of them
    sync()
    start, steps, tokens = time.perf_counter(), 0, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        steps += 1
    sync()
    return time.perf_counter() - start, steps, tokens[ids[0]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: real config, random weights)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint and sizes (CPU-capable)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    ks, batches, context, new_tokens = ([1, 2], [1, 2], 48, 12) if smoke else ([1, 2, 3, 4], [1, 8, 32], 1024, 128)
    out_dir = output_dir(args.out, smoke)
    prompt = "x" * (context - 16)  # one byte-level token per character; ~16 template tokens
    oracle = Oracle(context + new_tokens + 64)
    oracle.install()
    rows, plain = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_checkpoint(Path(tmp) / "ckpt", tiny_config() if smoke else real_config(), dtype=DTYPE)
        options = dict(device=DEVICE, dtype=DTYPE, max_num_seqs=max(batches),
                       kv_cache_tokens=max(batches) * (context + new_tokens + 64), max_model_len=context + new_tokens + 32)
        for k in [0] + ks:
            engine = LLMEngine(str(path), num_speculative_tokens=k, **options)
            if k == 0:  # the continuation the oracle drafts, and the baseline
                _, _, cont = decode(engine, prompt, 1, new_tokens + 32)
                prompt_ids = engine.prepare({"prompt": prompt}).prompt_token_ids
                full = torch.tensor(prompt_ids + cont, dtype=torch.int64)
                oracle.tokens[: len(full)] = full.to(DEVICE)
            for batch in batches:
                decode(engine, prompt, batch, 4)  # warm-up (compiles kernels of this batch's shapes)
                if k == 0:
                    seconds, steps, _ = decode(engine, prompt, batch, new_tokens)
                    plain[batch] = dict(ms_per_step=seconds / steps * 1e3, tokens_per_s=batch * (new_tokens - 1) / seconds)
                    continue
                oracle.on.fill_(True)
                for keep in (1.0, 0.75):
                    oracle.keep.fill_(keep)
                    engine.spec_stats = spec_decode.SpecDecodeStats(k)
                    seconds, steps, _ = decode(engine, prompt, batch, new_tokens)
                    stats = engine.spec_stats
                    tps = batch * (new_tokens - 1) / seconds
                    rows.append(dict(k=k, batch=batch, draft_accuracy=keep, ms_per_step=seconds / steps * 1e3,
                                     tokens_per_s=tps, speedup=tps / plain[batch]["tokens_per_s"],
                                     acceptance=stats.num_accepted_tokens / max(stats.num_draft_tokens, 1),
                                     mean_accepted_length=stats.mean_accepted_length))
                oracle.on.fill_(False)
            del engine
            if CUDA:
                torch.cuda.empty_cache()

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=smoke, cuda_graphs=CUDA, context=context,
                    new_tokens=new_tokens)
    lines = [f"# MTP speculative decoding on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, CUDA graphs {CUDA}, context {context}, {new_tokens} greedy tokens per request", "",
             "| batch | plain ms/step | plain tok/s |", "|---|---|---|"]
    lines += [f"| {b} | {p['ms_per_step']:.3f} | {p['tokens_per_s']:.4g} |" for b, p in plain.items()]
    lines += ["", "| k | batch | draft accuracy | ms/step | tok/s | vs plain | acceptance | tokens/step |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['batch']} | {r['draft_accuracy']:.2f} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:.4g} | "
              f"{r['speedup']:.2f}x | {r['acceptance']:.2f} | {r['mean_accepted_length']:.2f} |" for r in rows]
    print("\n".join(lines))
    write_report(out_dir, "spec_decode", meta, dict(plain=plain, rows=rows), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
