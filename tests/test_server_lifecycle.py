"""What a request holds and leaves behind over its life in `glmrt serve`: a stream nobody reads, a
client that leaves, /metrics while prompts prefill, POST /glmocr/parse's bounds, and a graceful
shutdown (SIGTERM with requests in flight).

The server tests talk HTTP to real server processes on the tiny checkpoint: one module-scoped
`server` (chunked prefill in small chunks, one sequence and no queue, the tiny layout model, small
document limits), and one for the shutdown test, which the test ends itself.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import gc
import io
import json
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest

import glmrt
from glmrt.engine.async_engine import AsyncEngine
from glmrt.outputs import RequestOutput
from glmrt_testing.documents import make_pdf
from glmrt_testing.engine_checks import assert_all_free
from glmrt_testing.helpers import make_image
from glmrt_testing.server_process import ServerProcess

CHAT, COMPLETIONS, PARSE = "/v1/chat/completions", "/v1/completions", "/glmocr/parse"
MAX_MODEL_LEN = 8192
CHUNK_TOKENS = 16  # --max-num-batched-tokens: a long prompt is prefilled in many steps
MAX_DOCUMENTS, MAX_PAGES = 2, 2  # --max-images-per-request, --max-pages-per-request


def chat(text: str, **fields: Any) -> dict:
    return {"model": "glm-ocr", "messages": [{"role": "user", "content": text}], "temperature": 0, **fields}


def png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_layout_checkpoint):
    layout = tiny_layout_checkpoint
    with ServerProcess(tiny_checkpoint, "--served-model-name", "glm-ocr", "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-batched-tokens", str(CHUNK_TOKENS), "--max-num-seqs", "1", "--max-queue", "0",
                       "--layout-model", str(layout), "--max-images-per-request", str(MAX_DOCUMENTS),
                       "--max-pages-per-request", str(MAX_PAGES)) as server:
        yield server


def changes(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    """The counters under `prefix` that moved between two /metrics snapshots, by how much."""
    return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix) and after[k] != before.get(k, 0.0)}


# -------------------------------------------------------------------------------------- streams

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
        waiting = [o for o in gc.get_objects() if type(o) is RequestOutput and o.request_id == "stalled"
                   and o is not first]
        assert len(waiting) == 1 and len(waiting[0].token_ids) == n, (len(waiting), sum(
            len(o.token_ids) for o in waiting))
        rest = [out async for out in stream]
        assert len(rest) == 1 and rest[0].finish_reason == "length"
        engine.close()  # the engine is the core thread's until then
        (alone,) = engine.engine.generate([request], [params])
        assert first.delta_text + rest[0].delta_text == alone.text == rest[0].text
        assert first.delta_token_ids + rest[0].delta_token_ids == alone.token_ids

    asyncio.run(scenario())


def test_steps_go_on_while_the_default_executor_is_busy(tiny_checkpoint):
    """Every worker of the event loop's default executor blocked (as by many requests' image
    decoding at once): a running request's steps still run, on the engine's own thread."""
    async def scenario():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=512)
        stream = engine.generate({"prompt_token_ids": [1, 2, 3]}, glmrt.SamplingParams(max_tokens=40, ignore_eos=True))
        await stream.__anext__()
        release = threading.Event()
        blockers = [asyncio.to_thread(release.wait, 60) for _ in range(4)]
        blocked = asyncio.gather(*blockers)
        try:
            outputs = await asyncio.wait_for(_drain(stream), 30)
        finally:
            release.set()
            await blocked
        assert outputs[-1].finish_reason == "length" and len(outputs[-1].token_ids) == 40
        engine.close()

    asyncio.run(scenario())


def test_steps_go_on_while_the_event_loop_is_blocked(tiny_checkpoint, monkeypatch):
    """The event loop held for 200 ms (a large body being parsed, Python work on the loop): the
    engine steps on meanwhile, on its own thread. When steps were launched from the loop, the
    engine ran at most the one step under way, then idled until the loop was free. (A step of the
    tiny model takes ~3 ms on a CPU: dozens fit in the block; 3 are asked for.)"""
    async def scenario():
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch",
                             max_model_len=512)
        steps, step = [0], engine.engine.step

        def counted_step():
            steps[0] += 1
            return step()

        monkeypatch.setattr(engine.engine, "step", counted_step)
        stream = engine.generate({"prompt_token_ids": [1, 2, 3]}, glmrt.SamplingParams(max_tokens=400, ignore_eos=True))
        for _ in range(2):  # decoding
            await stream.__anext__()
        before = steps[0]
        time.sleep(0.2)  # the loop held: no callback, no task runs meanwhile
        during = steps[0] - before
        assert during >= 3, f"{during} engine steps while the event loop was blocked for 200 ms"
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "length" and len(rest[-1].token_ids) == 400
        engine.close()

    asyncio.run(scenario())


def test_close_ends_running_requests_and_joins_the_engine_thread(tiny_checkpoint, monkeypatch):
    """AsyncEngine.close() (the server's last act on shutdown) with a request decoding and one
    being prepared: each ends with an "abort" output (the first holding its tokens so far), the
    engine's thread is gone, everything it held is freed, and a later request is refused."""
    async def scenario():
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch",
                             max_model_len=512)
        params = glmrt.SamplingParams(max_tokens=400, ignore_eos=True)
        stream = engine.generate({"prompt_token_ids": [1, 2, 3]}, params)
        await stream.__anext__()
        prepare, release = engine.engine.prepare, threading.Event()
        monkeypatch.setattr(engine.engine, "prepare", lambda *args: release.wait(30) and prepare(*args))
        preparing = asyncio.ensure_future(_drain(engine.generate({"prompt_token_ids": [4, 5]}, params)))
        while not engine._preparing:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.close)
        assert not engine._core._thread.is_alive()
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "abort" and 0 < len(rest[-1].token_ids) < 400
        release.set()
        (prepared,) = await preparing
        assert prepared.finish_reason == "abort" and prepared.prompt_token_ids == [4, 5]
        assert not engine._streams
        with pytest.raises(RuntimeError, match="shut down"):
            await engine.generate({"prompt_token_ids": [1, 2, 3]}).__anext__()
        assert not engine._streams
        assert_all_free(engine.engine)

    asyncio.run(scenario())


async def _drain(stream) -> list:
    return [out async for out in stream]


# ----------------------------------------------------------------------------- /metrics, clients

def test_metrics_count_a_prefilling_request_as_running(server):
    """A 1,900-token prompt prefilled 16 tokens a step: from the moment the engine holds it until
    its token is read, every scrape counts it, as waiting and then as running (it read as neither
    while it prefilled)."""
    server.wait_idle()
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


def test_a_request_not_streamed_is_timed_from_its_first_token(server):
    """A request that is not streamed gets only its final output from the engine (output_kind
    "final_only"), and /metrics still times it as one that streams: its time to first token is when
    the engine read that token (before the end), the rest one inter-token latency, every token counted."""
    before = server.wait_idle()
    body = {"model": "glm-ocr", "prompt": [1000 + i for i in range(40)], "max_tokens": 12, "ignore_eos": True}
    response = httpx.post(server.url + COMPLETIONS, json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 12
    moved = changes(before, server.metrics(), "glmrt:")
    assert moved["glmrt:time_to_first_token_seconds_count"] == moved["glmrt:inter_token_latency_seconds_count"] == 1
    assert moved["glmrt:generation_tokens_total"] == 12
    ttft, e2e = moved["glmrt:time_to_first_token_seconds_sum"], moved["glmrt:e2e_request_latency_seconds_sum"]
    assert 0 < ttft < e2e


def test_a_client_that_leaves_is_an_abort_and_logs_no_error(server):
    """A non-streaming client that gives up mid-decode, and one that leaves while sending its
    body: 499s in the status counts, the first an "abort" in the finish reasons, nothing logged."""
    log_start = len(server.read_log())
    before = server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=chat("hello", max_tokens=8000, ignore_eos=True),
                   timeout=httpx.Timeout(30.0, read=0.5))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: glmrt\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.3)
    after = server.wait_idle(timeout_s=5.0)  # long before the 8,000 tokens would be done
    assert changes(before, after, "glmrt:http_requests_total{endpoint=\"/v1/") == {
        f'glmrt:http_requests_total{{endpoint="{CHAT}",status="499"}}': 2}
    assert changes(before, after, "glmrt:request_success_total") == {
        'glmrt:request_success_total{finished_reason="abort"}': 1}
    log = server.read_log()[log_start:]
    assert "Traceback" not in log and "ERROR" not in log, log


# ------------------------------------------------------------------------------- /glmocr/parse

def test_parse_refuses_more_documents_or_pages_than_its_limits(server, tmp_path):
    """Counted before anything is rendered or queued: a 400 naming the limit (100 images and a
    1,000-page PDF used to be accepted, every page rendered into memory first)."""
    image = png_uri(make_image(100, 80, 0))

    def pdf(pages: int) -> str:
        path = make_pdf(tmp_path / f"{pages}.pdf", pages=pages, size=(200, 260))
        return "data:application/pdf;base64," + base64.b64encode(path.read_bytes()).decode()

    response = httpx.post(server.url + PARSE, json={"images": [image] * (MAX_DOCUMENTS + 1)}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "images" and f"limit of {MAX_DOCUMENTS} per request" in error["message"], error
    for body in ({"file": pdf(3)}, {"images": [image, pdf(2)]}):  # pages of all documents together
        response = httpx.post(server.url + PARSE, json=body, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == next(iter(body)), error
        assert "3 pages" in error["message"] and f"limit of {MAX_PAGES} pages" in error["message"], error


def test_parse_is_admitted_against_the_in_flight_limit(server):
    """--max-num-seqs 1 --max-queue 0: with a chat request in flight, a document is refused at once."""
    server.wait_idle()
    with httpx.Client(timeout=60) as client:
        body = chat("hello", max_tokens=8000, ignore_eos=True, stream=True)
        with client.stream("POST", server.url + CHAT, json=body) as stream:
            assert stream.status_code == 200
            refused = client.post(server.url + PARSE, json={"images": [png_uri(make_image(100, 80, 0))]}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit(), refused.text


def test_a_parse_whose_client_leaves_is_cancelled_and_counted(server):
    """The client leaves while the page's regions are being recognised (one has its first token,
    counted in /metrics as a chat request's): their engine requests are aborted at once and counted
    (the work used to go on for a minute after the client left, out of /metrics), the parse
    counted as a 499."""
    before = server.wait_idle()
    body = json.dumps({"images": [png_uri(make_image(100, 80, 0))]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST {PARSE} HTTP/1.1\r\nHost: glmrt\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while not changes(before, server.metrics(), "glmrt:prompt_tokens_total"):  # layout, then a region
            assert time.monotonic() < deadline, "no region has a token counted in /metrics"
            time.sleep(0.02)
    after = server.wait_idle(timeout_s=5.0)  # one region alone runs for ~8,000 tokens
    assert changes(before, after, f'glmrt:http_requests_total{{endpoint="{PARSE}"') == {
        f'glmrt:http_requests_total{{endpoint="{PARSE}",status="499"}}': 1}
    finished = changes(before, after, "glmrt:request_success_total")
    assert list(finished) == ['glmrt:request_success_total{finished_reason="abort"}'], finished


# ------------------------------------------------------------------------------------- shutdown

async def _request(client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event) -> dict:
    """-> {"status", "events" (SSE data, decoded) or "body", "ended" (monotonic)}; `started` is
    set once a stream's first content arrives (at once for a plain request)."""
    if not body.get("stream"):
        started.set()
        response = await client.post(url, json=body)
        return {"status": response.status_code, "body": response.json(), "ended": time.monotonic()}
    events = []
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if _content(events[-1:]):
                    started.set()
    return {"status": response.status_code, "events": events, "ended": time.monotonic()}


def _content(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


async def _sigterm_during(server: ServerProcess, bodies: list[dict]) -> tuple[float, list[dict], list[Any]]:
    """Sends the requests, then SIGTERM once all of them run and every stream has content; ->
    (when SIGTERM was sent, their results, what requests sent after it got)."""
    async with httpx.AsyncClient(timeout=60) as client:
        started = [asyncio.Event() for _ in bodies]
        tasks = [asyncio.ensure_future(_request(client, server.url + CHAT, body, event))
                 for body, event in zip(bodies, started)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
        while server.metrics()["glmrt:num_requests_running"] < len(bodies):
            await asyncio.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        late = []
        for _ in range(2):  # on a new connection: a 503 until the listening socket is closed, then refused
            try:
                async with httpx.AsyncClient(timeout=10) as fresh:
                    late.append((await fresh.post(server.url + CHAT, json=chat("hello", max_tokens=1))).status_code)
            except httpx.ConnectError:
                late.append("refused")
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # Connected in the instant the listening socket closed: the kernel's backlog (or a
                # connection whose request was not read yet) is dropped without an answer; nothing
                # of it reached the engine, so it is a refusal too.
                late.append("refused")
            await asyncio.sleep(0.3)
        return sent, await asyncio.gather(*tasks), late


def test_sigterm_lets_requests_in_flight_finish_and_ends_the_rest_cleanly(tiny_checkpoint):
    """SIGTERM with four requests decoding and --shutdown-timeout 8: new requests are refused at
    once; the two that need 60 tokens finish with their whole text; the two that need 16,000 run
    on for the drain timeout, then end with a 503 (an error event, then [DONE], in the stream);
    the server exits, logging no error (it used to cut everything after 5 s: a stream without an
    error event, a 500 "aclose(): asynchronous generator is already running")."""
    drain_s = 8.0
    short = chat("hello", max_tokens=60, ignore_eos=True)
    long = chat("hello", max_tokens=16000, ignore_eos=True)  # 20 s or more on a CPU
    bodies = [{**short, "stream": True}, short, {**long, "stream": True}, long]
    with ServerProcess(tiny_checkpoint, "--served-model-name", "glm-ocr", "--max-model-len", "16384",
                       "--shutdown-timeout", str(drain_s)) as server:
        sent, (short_stream, short_plain, long_stream, long_plain), late = asyncio.run(_sigterm_during(server, bodies))
        server.proc.wait(timeout=drain_s + 10)
        exited = time.monotonic()
        log = server.read_log()

    assert all(answer in (503, "refused") for answer in late), late
    assert short_plain["status"] == 200 and short_plain["body"]["usage"]["completion_tokens"] == 60
    assert short_stream["status"] == 200 and short_stream["events"][-1] == "[DONE]"
    assert short_stream["events"][-2]["choices"][0]["finish_reason"] == "length"
    assert _content(short_stream["events"]) == short_plain["body"]["choices"][0]["message"]["content"]
    assert sent < short_plain["ended"] and sent < short_stream["ended"]  # both were in flight at SIGTERM

    assert long_plain["status"] == 503, long_plain
    assert "shutting down" in long_plain["body"]["error"]["message"]
    assert long_stream["status"] == 200 and long_stream["events"][-1] == "[DONE]"
    error = long_stream["events"][-2]
    assert set(error) == {"error"} and error["error"]["code"] == 503 and "shutting down" in error["error"]["message"]
    assert _content(long_stream["events"][:-2])
    for ended in (long_plain["ended"], long_stream["ended"]):
        assert drain_s - 0.5 < ended - sent < drain_s + 4  # ran on for the drain timeout, then ended
    assert exited - sent < drain_s + 8
    assert "Traceback" not in log and "ERROR" not in log, log
