"""Batch invariance: a request's raw logits and reported log-probabilities at every step are the
same bits (torch.equal) whatever else shares its steps.

The Triton backend (the interpreter on CPU): a probe request with an image, alone and in batches
of 2, 7, 17 and 32 requests of mixed lengths; async vs sync scheduling; MTP speculation (k = 3:
the logits of every accepted token) vs none; a 600-token prompt prefilled whole vs in chunks of
64 and 500 beside other requests' decode rows; the probe preempted and recomputed. All in fp32;
fp16 (the interpreter is slow) the batch of 17 and chunks of 64. (On CPU there are
no CUDA graphs: a decode step runs its bucket's rows eagerly, as a replay would, and decode
attention folds its key splits in-program, as prefill does; the kernel tests show the GPU's
split-in-grid path gives the same bits, and tests/test_gpu.py compares graph vs eager.)

Every step's raw logits are recorded at the one place they all pass through,
ModelRunner.logprobs_of (called for every step in which a row asks for log-probabilities: here
every request does), and assigned to the step's sequences and their accepted tokens.
The last test shows the property can fail: with one kernel made M-dependent. GLMRT_BATCH_INVARIANT=0
runs the whole file on the batch-tuned kernels (batch_invariant=False, the kernels glmrt ran
before): it fails.
"""
import os

import pytest
import torch

import glmrt
from glmrt.engine.engine import LLMEngine
from glmrt_testing.engine_checks import LogitsRecorder, logits_differences
from glmrt_testing.helpers import make_image

PROBE_TOKENS = 5
FILLER_TOKENS = (1, 3, 2)  # fillers finish at different steps: the batch shrinks under the probe
NUM_LOGPROBS = 5


def probe():
    return {"images": [make_image(60, 44, 7)], "prompt": "Text Recognition:"}


def token_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 50_000, (n,), generator=g).tolist()


LONG_PROMPT = {"prompt_token_ids": token_ids(600, 1)}  # whole vs chunks of 64 and 500


def fillers(n: int, seed: int = 0) -> list[tuple[dict, glmrt.SamplingParams]]:
    """n text requests of 3..80 prompt tokens and 1..8 output tokens."""
    lengths = torch.randint(3, 81, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [({"prompt_token_ids": token_ids(length, seed * 100 + i)},
             params(FILLER_TOKENS[i % len(FILLER_TOKENS)])) for i, length in enumerate(lengths)]


def params(max_tokens: int) -> glmrt.SamplingParams:
    return glmrt.SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=NUM_LOGPROBS)


def run(recorder: LogitsRecorder, requests: list[tuple[dict, glmrt.SamplingParams]]):
    """-> (output, logits [tokens, V]) per request, in order."""
    return recorder.generate([r for r, _ in requests], [p for _, p in requests])


BATCH_INVARIANT = os.environ.get("GLMRT_BATCH_INVARIANT", "1") != "0"


def make_engine(path, dtype, **options):
    options = {"max_model_len": 1024, "batch_invariant": BATCH_INVARIANT, **options}
    return LLMEngine(str(path), device="cpu", dtype=dtype, backend="triton", **options)


@pytest.fixture(scope="module", params=["float32", "float16"])
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def default_engine(tiny_checkpoint, dtype):
    engine = make_engine(tiny_checkpoint, dtype)
    return engine, LogitsRecorder(engine)


@pytest.fixture(scope="module")
def alone(default_engine):
    """The probe alone and the long prompt alone (prefilled whole): the references."""
    _, recorder = default_engine
    (p,) = run(recorder, [(probe(), params(PROBE_TOKENS))])
    (long,) = run(recorder, [(LONG_PROMPT, params(PROBE_TOKENS))])
    assert len(p[0].token_ids) == PROBE_TOKENS and len(p[0].logprobs) == PROBE_TOKENS
    return p, long


def assert_same(got, want, what: str) -> None:
    found = logits_differences(got, want)
    assert not found, f"{what}: " + "; ".join(found[:4])


@pytest.mark.parametrize("size,position", [(2, 1), (7, 3), (17, 16), (32, 0)])
def test_alone_or_in_a_batch(default_engine, alone, dtype, size, position):
    if dtype == "float16" and size != 17:
        pytest.skip("fp16 runs a batch of 17 (the interpreter is slow)")
    _, recorder = default_engine
    requests = fillers(size - 1, seed=size)
    requests.insert(position, (probe(), params(PROBE_TOKENS)))
    results = run(recorder, requests)
    assert_same(results[position], alone[0], f"the probe in a batch of {size}")


def test_sync_scheduling(tiny_checkpoint, alone, dtype):
    if dtype == "float16":
        pytest.skip("fp32 only (the interpreter is slow)")
    engine = make_engine(tiny_checkpoint, dtype, async_scheduling=False)
    recorder = LogitsRecorder(engine)
    requests = fillers(6, seed=3)
    requests.insert(2, (probe(), params(PROBE_TOKENS)))
    assert_same(run(recorder, requests)[2], alone[0], "sync scheduling, batch of 7")


@pytest.mark.parametrize("budget", [64, 500])
def test_chunked_prefill(tiny_checkpoint, alone, dtype, budget):
    """The long prompt in chunks of `budget` tokens, in steps with the fillers' decode rows."""
    if dtype == "float16" and budget == 500:
        pytest.skip("fp16 runs chunks of 64 (the interpreter is slow)")
    engine = make_engine(tiny_checkpoint, dtype, max_num_batched_tokens=budget)
    recorder = LogitsRecorder(engine)
    requests = fillers(3, seed=4) + [(LONG_PROMPT, params(PROBE_TOKENS))]
    assert_same(run(recorder, requests)[3], alone[1], f"chunks of {budget}")


def test_speculative_decoding(tiny_checkpoint, alone, dtype):
    """MTP drafts (k = 3) verified in one step: every accepted token's logits as plain decoding's."""
    if dtype == "float16":
        pytest.skip("fp32 only (the interpreter is slow)")
    engine = make_engine(tiny_checkpoint, dtype, num_speculative_tokens=3)
    recorder = LogitsRecorder(engine)
    requests = fillers(6, seed=5)
    requests.insert(4, (probe(), params(PROBE_TOKENS)))
    results = run(recorder, requests)
    assert engine.spec_stats.num_drafts > 0
    assert_same(results[4], alone[0], "speculative decoding (k = 3), batch of 7")


def test_preempted_and_recomputed(tiny_checkpoint, alone, dtype):
    """A 16-block KV cache that a 206-token request and the probe (34 prompt tokens, admitted
    second) fill at once: when the first needs a new block a few steps in, the probe is
    preempted; its recompute prefills its prompt and the tokens it had, and its next logits come
    out of that prefill as they did from decoding."""
    if dtype == "float16":
        pytest.skip("fp32 only (the interpreter is slow)")
    engine = make_engine(tiny_checkpoint, dtype, max_model_len=256, kv_cache_tokens=256)
    recorder = LogitsRecorder(engine)
    requests = [({"prompt_token_ids": token_ids(206, 10)}, params(12)), (probe(), params(PROBE_TOKENS))]
    results = run(recorder, requests)
    assert results[1][0].request_id in recorder.preempted
    assert_same(results[1], alone[0], "preempted and recomputed")


def test_the_property_fails_when_a_kernel_follows_m(tiny_checkpoint, dtype, monkeypatch):
    """The comparison can fail: make the GEMM's norm tile follow M (as the batch-tuned
    configuration does) and the probe's logits in a batch of 7 are no longer its logits alone."""
    from glmrt.kernels import linear

    if dtype == "float16":
        pytest.skip("one dtype shows it")
    config = linear._launch_config

    def m_dependent(m, k, *args, **kwargs):
        tiles = config(m, k, *args, **kwargs)
        return {**tiles, "NORM_K": max(16, tiles["NORM_K"] // 2)} if m > 1 else tiles

    monkeypatch.setattr(linear, "_launch_config", m_dependent)
    engine = make_engine(tiny_checkpoint, dtype)
    recorder = LogitsRecorder(engine)
    (alone,) = run(recorder, [(probe(), params(3))])
    requests = fillers(6, seed=7)
    requests.insert(3, (probe(), params(3)))
    assert logits_differences(run(recorder, requests)[3], alone)
