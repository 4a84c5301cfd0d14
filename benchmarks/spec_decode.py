"""MTP speculative decoding vs plain decoding, CUDA graphs on both, in one run on one device.

    python benchmarks/spec_decode.py [--model DIR_OR_HUB_ID] [--key] [--out DIR] [--smoke]

For k speculative tokens, batches and contexts (each request: the same prompt of exactly
`context` text tokens, a fixed number of greedy tokens): ms per speculative (draft + verify)
step, and decode tokens/s (a) at full acceptance and (b) at the published acceptance of ~0.75
per draft token, against plain graph decoding (k = 0, its own engine) at the same batch and
context. Random weights accept almost nothing, so the drafts are replaced inside the captured
step by an oracle: the greedy continuation, measured first with plain decoding at batch 1, with
each draft spoiled at a fixed pseudo-random 25% of (position, index) pairs in (b). The MTP layer
still runs in full every step, so the timing is the real drafter's. Acceptance actually achieved
and tokens per step are reported beside each row (in bf16 a batch can diverge from the batch-1
continuation, which lowers them).

The whole batch is prefilled in one step (the token budget covers it), and only the decode steps
after it are timed, so every timed step runs all rows.

- default: k = 1..4, batches 1, 8 and 32, context 1024, 128 greedy tokens per request;
- --key (the GPU suite's key numbers): k = 2 and 3, batches 1 and 32, contexts 1024 and 4096,
  64 tokens per request: 2 x 2 x 2 x 2 speculative rows, each against plain decoding.

--model is a GLM-OCR checkpoint with its MTP layer (a directory or Hub id); without it a
real-size one with random weights is written to a temp dir. Writes <out>/spec_decode-<device>-
<timestamp>.json and .md. `--smoke` runs on CPU, eager, with small sizes (and the tiny test
checkpoint unless --model is given) to prove the code path (numbers meaningless).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import CUDA, key_row, metadata, output_dir, provenance, sync, write_report  # noqa: E402

import glmrt  # noqa: E402
from glmrt.engine import spec_decode  # noqa: E402
from glmrt.engine.engine import LLMEngine  # noqa: E402
from glmrt_testing.random_weights import write_glm_ocr  # noqa: E402
from glmrt_testing.tiny_checkpoint import tiny_config  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# Prompts are this text's tokens, repeated to the context length: ordinary text in any tokenizer.
TEXT = ("Invoice 2024-117. Seller: Northwind Traders, 12 Harbour Road. Items: 3 x desk lamp at 24.50, "
        "1 x office chair at 189.00, 12 x notebook at 2.25. Total due within 30 days. ")
PLAIN = "glmrt plain graph decode" if CUDA else "glmrt plain eager decode"
# (k values, batches, contexts, greedy tokens per request) by (--key, --smoke)
SIZES = {(True, False): ([2, 3], [1, 32], [1024, 4096], 64), (True, True): ([2, 3], [1, 2], [16, 32], 8),
         (False, False): ([1, 2, 3, 4], [1, 8, 32], [1024], 128), (False, True): ([1, 2], [1, 2], [48], 12)}


class Oracle:
    """Device tensors the captured step reads (set before an engine is built, filled later): the
    continuation and the share of drafts left correct."""

    def __init__(self, length: int):
        self.tokens = torch.zeros(length, dtype=torch.int64, device=DEVICE)
        self.keep = torch.ones((), dtype=torch.float32, device=DEVICE)

    def install(self) -> None:
        """Wrap SpeculativeDecoder.propose: run the MTP drafter, then replace its drafts."""
        propose, oracle = spec_decode.SpeculativeDecoder.propose, self

        def with_oracle(decoder, bs):
            propose(decoder, bs)  # its drafts are dropped
            index = decoder.batch.context_lens[:bs, None].long() + 1 + decoder.positions[:-1]  # [bs, k]
            right = oracle.tokens[index.clamp(max=oracle.tokens.shape[0] - 1)]
            spoil = ((index * 2654435761 + 40503) % 1000).float() >= 1000 * oracle.keep
            return torch.where(spoil, (right + 1) % decoder.model.config.text.vocab_size, right)

        spec_decode.SpeculativeDecoder.propose = with_oracle

    def load(self, sequence: torch.Tensor) -> None:
        """The prompt + greedy continuation [n] that the drafts of the next runs copy."""
        self.tokens.zero_()
        self.tokens[: len(sequence)] = sequence.to(DEVICE)


def prompt_ids(engine: LLMEngine, context: int) -> list[int]:
    """Exactly `context` tokens of TEXT, repeated (a raw prompt: no chat template)."""
    ids = engine.processor.tokenizer.encode(TEXT, add_special_tokens=False).ids
    return (ids * (context // len(ids) + 1))[:context]


def decode(engine: LLMEngine, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, int, list[int]]:
    """batch copies of the prompt, all prefilled in the first step; -> (seconds of the decode
    steps after it, their number, the tokens of row 0)."""
    params = glmrt.SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": prompt}, params) for _ in range(batch)]
    engine.step()  # the prefill of all of them
    assert len(engine.scheduler.running) == batch, "the whole batch must be prefilled in the first step"
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
    parser.add_argument("--model", help="GLM-OCR checkpoint dir or Hub id, with its MTP layer "
                                        "(default: real config, random weights, written to a temp dir)")
    parser.add_argument("--key", action="store_true", help="only the GPU suite's key numbers (see above)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="small sizes, CPU-capable (tiny checkpoint without --model)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    ks, batches, contexts, new_tokens = SIZES[args.key, smoke]
    out_dir = output_dir(args.out, smoke)
    if smoke and not CUDA:
        torch.set_num_threads(1)  # tiny tensors: more threads only add overhead
    oracle = Oracle(max(contexts) + new_tokens + 64)
    oracle.install()
    max_model_len = max(contexts) + new_tokens + 32
    # One step prefills the whole largest batch; the KV cache holds it with room for k + 1 slots per step.
    options = dict(device=DEVICE, dtype=DTYPE, max_num_seqs=max(batches), max_model_len=max_model_len,
                   max_num_batched_tokens=max(batches) * max(contexts),
                   kv_cache_tokens=max(batches) * (max(contexts) + new_tokens + 64))
    plain, rows, key, continuations = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(write_glm_ocr(Path(tmp) / "ckpt", tiny_config() if smoke else None,
                                               device=DEVICE, dtype=DTYPE))
        for k in [0] + ks:
            built, engine = time.perf_counter(), LLMEngine(path, num_speculative_tokens=k, **options)
            print(f"k={k}: engine built in {time.perf_counter() - built:.1f} s", flush=True)
            decode(engine, prompt_ids(engine, 16), 1, 4)  # warm-up: first prefill, first steps
            for context in contexts:
                prompt = prompt_ids(engine, context)
                if k == 0:  # the continuation the oracle drafts
                    _, _, cont = decode(engine, prompt, 1, new_tokens + 8)
                    continuations[context] = torch.tensor(prompt + cont, dtype=torch.int64)
                else:
                    oracle.load(continuations[context])
                for batch in batches:
                    if k == 0:
                        seconds, steps, _ = decode(engine, prompt, batch, new_tokens)
                        plain.append(dict(batch=batch, context=context, ms_per_step=seconds / steps * 1e3,
                                          tokens_per_s=batch * (new_tokens - 1) / seconds))
                        continue
                    base = next(p for p in plain if p["batch"] == batch and p["context"] == context)
                    for keep in (1.0, 0.75):
                        oracle.keep.fill_(keep)
                        engine.spec_stats = spec_decode.SpecDecodeStats(k)
                        seconds, steps, _ = decode(engine, prompt, batch, new_tokens)
                        stats = engine.spec_stats
                        tps = batch * (new_tokens - 1) / seconds
                        rows.append(dict(k=k, batch=batch, context=context, draft_accuracy=keep,
                                         ms_per_step=seconds / steps * 1e3, tokens_per_s=tps,
                                         plain_tokens_per_s=base["tokens_per_s"], speedup=tps / base["tokens_per_s"],
                                         acceptance=stats.num_accepted_tokens / max(stats.num_draft_tokens, 1),
                                         mean_accepted_length=stats.mean_accepted_length))
                        key.append(key_row(f"MTP k={k} decode tokens/s, batch {batch}, context {context}, "
                                           f"oracle drafts {keep:.0%} correct", "tokens/s", tps, better="higher",
                                           peer=base["tokens_per_s"], peer_name=PLAIN))
            del engine
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()

    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=smoke, key_only=args.key, model=args.model,
                    cuda_graphs=CUDA, contexts=contexts, new_tokens=new_tokens)
    lines = [f"# MTP speculative decoding on {meta['device']['name']}", "", provenance(meta),
             f"- {meta['dtype']}, CUDA graphs {CUDA}, {new_tokens} greedy tokens per request, "
             f"checkpoint {args.model or 'random weights (real config)'}", "",
             "| batch | context | plain ms/step | plain tok/s |", "|---|---|---|---|"]
    lines += [f"| {p['batch']} | {p['context']} | {p['ms_per_step']:.3f} | {p['tokens_per_s']:.4g} |" for p in plain]
    lines += ["", "| k | batch | context | draft accuracy | ms/step | tok/s | vs plain | acceptance | tokens/step |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['batch']} | {r['context']} | {r['draft_accuracy']:.2f} | {r['ms_per_step']:.3f} | "
              f"{r['tokens_per_s']:.4g} | {r['speedup']:.2f}x | {r['acceptance']:.2f} | {r['mean_accepted_length']:.2f} |"
              for r in rows]
    print("\n".join(lines))
    write_report(out_dir, "spec_decode", meta, dict(plain=plain, rows=rows, key=key), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
