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

import glmrt
from glmrt.engine.async_engine import AsyncEngine
from glmrt.outputs import RequestOutput


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
