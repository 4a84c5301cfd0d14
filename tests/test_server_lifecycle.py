"""What a request holds and leaves behind over its life in `glmrt serve`: a stream nobody reads, a
client that leaves, /metrics while prompts prefill, POST /glmocr/parse's bounds, and a graceful
shutdown (SIGTERM with requests in flight).

The server tests talk HTTP to real server processes on the tiny checkpoint: one module-scoped
`server` (chunked prefill in small chunks, one sequence and no queue, the tiny layout model, small
document limits), and one server per shutdown test, which the test ends itself.
"""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import httpx
import pytest

import glmrt
from glmrt.engine.async_engine import AsyncEngine
from glmrt.outputs import RequestOutput
from glmrt_testing.server_process import ServerProcess

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_MODEL_LEN = 2048
CHUNK_TOKENS = 16  # --max-num-batched-tokens: a long prompt is prefilled in many steps


def chat(text: str, **fields: Any) -> dict:
    return {"model": "glm-ocr", "messages": [{"role": "user", "content": text}], "temperature": 0, **fields}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ServerProcess(tiny_checkpoint, "--served-model-name", "glm-ocr", "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-batched-tokens", str(CHUNK_TOKENS), "--max-num-seqs", "1", "--max-queue", "0") as server:
        yield server


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return metrics.get(key, 0.0)


def wait_idle(server: ServerProcess, timeout_s: float = 10.0) -> dict[str, float]:
    """Polls /metrics until nothing runs, waits or holds a KV block; -> that snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        idle = (m["glmrt:num_requests_running"], m["glmrt:num_requests_waiting"], m["glmrt:kv_cache_usage_perc"])
        if idle == (0, 0, 0):
            return m
        assert time.monotonic() < deadline, f"server not idle after {timeout_s} s: running, waiting, kv = {idle}"
        time.sleep(0.05)


def changes(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    """The counters under `prefix` that moved between two /metrics snapshots, by how much."""
    return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix) and after[k] != before.get(k, 0.0)}


def test_a_stream_nobody_reads_holds_one_output(tiny_checkpoint):
    """A streamed request whose consumer stops reading after the first output: while the engine
    generates the rest, one output waits for the consumer, not one per step (each output carries
    the whole output so far: 300 steps held 300 outputs, 45,000 token ids; 3,000 steps ~100 MB).
    Read afterwards, the deltas join up to the text and tokens of the same request run alone."""
    n = 300
    params = glmrt.SamplingParams(max_tokens=n, ignore_eos=True)
    request = {"prompt_token_ids": [1, 2, 3]}

    async def scenario():
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=512)
        stream = engine.generate(request, params, request_id="stalled")
        first = await stream.__anext__()
        while engine.engine.has_unfinished():
            await asyncio.sleep(0.02)
        waiting = [o for o in gc.get_objects() if isinstance(o, RequestOutput) and o.request_id == "stalled"
                   and o is not first]
        assert len(waiting) == 1 and len(waiting[0].token_ids) == n, (len(waiting), sum(
            len(o.token_ids) for o in waiting))
        rest = [out async for out in stream]
        assert len(rest) == 1 and rest[0].finish_reason == "length"
        (alone,) = engine.engine.generate([request], [params])
        assert first.delta_text + rest[0].delta_text == alone.text == rest[0].text
        assert first.delta_token_ids + rest[0].delta_token_ids == alone.token_ids

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- /metrics, clients

def test_metrics_count_a_prefilling_request_as_running(server):
    """A 1,900-token prompt prefilled 16 tokens a step: from the moment the engine holds it until
    its token is read, every scrape counts it, as waiting and then as running (it read as neither
    while it prefilled)."""
    wait_idle(server)
    body = {"model": "glm-ocr", "prompt": [1000 + i for i in range(1900)], "max_tokens": 1}
    done = threading.Event()

    def send() -> None:
        try:
            assert httpx.post(server.url + COMPLETIONS, json=body, timeout=60).status_code == 200
        finally:
            done.set()

    sender = threading.Thread(target=send)
    sender.start()
    scrapes = []
    while not done.is_set():
        m = server.metrics()
        scrapes.append((m["glmrt:num_requests_waiting"], m["glmrt:num_requests_running"]))
    sender.join()
    held = [i for i, counts in enumerate(scrapes) if counts != (0, 0)]
    assert held, scrapes
    during = scrapes[held[0]:held[-1] + 1]
    assert (0, 0) not in during and during.count((0, 1)) >= 3, scrapes
