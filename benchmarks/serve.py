"""`glmrt serve` under the glmocr SDK's traffic, and transformers on the same requests.

    python benchmarks/serve.py [--model DIR] [--key] [--requests N] [--concurrency 1 8 32]
                               [--baseline transformers|none] [--out DIR] [--smoke]

Starts `glmrt serve` on a checkpoint: --model, else one written to a temp dir: GLM-OCR's real
config with random bf16 weights on a GPU (random weights decode at the speed of real ones), the
tiny test checkpoint (with a 16k context) on CPU or with --smoke; on CPU the numbers measure the
HTTP server, preprocessing and the engine's host path more than the model. Then it sends what the
SDK sends after layout detection: N region crops of mixed sizes (text lines, formula crops, table
blocks, a full page now and then) as JPEG data URIs, image first then "Text Recognition:" /
"Formula Recognition:" / "Table Recognition:", greedy with temperature 0, top_p 1e-5, top_k 1 and
repetition_penalty 1.1, streamed. Each kind of region asks for a fixed number of tokens (about what
a real one of its kind produces; the SDK's max_tokens 8192 is only a cap, and random weights stop
at random), with ignore_eos, so that every run produces the same number of tokens.

Per concurrency (closed loop: that many requests in flight, the next sent as one finishes):
requests/s, output tokens/s, p50/p99 time to first token (request sent -> first SSE chunk, which
the server sends once the first token is sampled) and p50/p99 latency (request sent -> last
byte), and how many requests returned the same text as at concurrency 1.

--baseline transformers (default on a GPU and with --key; on CPU it compares the tiny model): the
same requests (decoded images, same prompts) through transformers' GlmOcrForConditionalGeneration.
generate (sdpa, the server's dtype), one at a time where concurrency 1 was measured, and in padded
batches of the highest concurrency (halved while it runs out of memory). A batch runs to its
longest request (min_new_tokens), so its requests finish together; only each request's own tokens
are counted. Side by side as ratios: glmrt at concurrency 1 against one at a time, glmrt at the
highest concurrency against the batches.

Key numbers (results["key"], quoted by the GPU suite): output tokens/s, requests/s and TTFT p50 of
glmrt serve at the highest concurrency, transformers' padded batches as the peer. --key measures
only them: 64 requests, 32 in flight, transformers in batches of 32 (sized for about 60 s on an H100,
most of it the server's start with its CUDA graphs and transformers' two batches of 512 steps). The
glmrt rows are made as soon as glmrt's run ends, without a peer, and again with it once
transformers' batches end, so that a run cut off in between still has glmrt's numbers.
Writes <out>/serve-<device>-<timestamp>.json and .md; --smoke: tiny requests of 4 tokens (16, or
--key's 64), to check that it works.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw

from common import key_row, metadata, output_dir, provenance, write_report

import glmrt  # noqa: E402
from glmrt.config import ModelConfig  # noqa: E402
from glmrt.image_processor import load_image  # noqa: E402
from glmrt.loader import resolve_model_path  # noqa: E402
from glmrt_testing import glmrt_command  # noqa: E402
from glmrt_testing.tiny_checkpoint import build_checkpoint, tiny_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODEL_NAME = "glm-ocr"  # what the SDK sends as "model"
# kind -> (prompt, (min, max) width, (min, max) height, new tokens); sizes as the SDK's crops of a
# page rendered at 200 dpi (A4: 1654x2339)
REGIONS = {
    "text": ("Text Recognition:", (600, 1400), (40, 90), 32),
    "formula": ("Formula Recognition:", (200, 600), (60, 160), 48),
    "table": ("Table Recognition:", (800, 1400), (300, 800), 256),
    "page": ("Text Recognition:", (1654, 1654), (2339, 2339), 512),
}
MIX = ["text"] * 8 + ["formula"] * 4 + ["table"] * 3 + ["page"]  # per 16 regions of a document
SMOKE_SCALE, SMOKE_TOKENS = 8, 4  # --smoke: sides / 8, 4 tokens each
KEY_REQUESTS, KEY_CONCURRENCY = 64, 32  # --key: 4 of each 16 requests' mix, two waves of 32
REQUEST_TIMEOUT_S = STARTUP_TIMEOUT_S = 600.0
SERVER_FLAGS = ["--served-model-name", MODEL_NAME, "--device", "cuda" if CUDA else "cpu",
                "--dtype", str(DTYPE).removeprefix("torch.")]
if not CUDA:  # the CPU default (one max_model_len of KV cache) would preempt at concurrency 32;
    SERVER_FLAGS += ["--kv-cache-tokens", "65536"]  # the tiny model's KV cache takes 512 bytes a token


@dataclasses.dataclass(frozen=True)
class Region:
    kind: str
    prompt: str
    width: int
    height: int
    jpeg: bytes
    max_tokens: int


@dataclasses.dataclass
class Record:
    """One request's measurements; times in seconds from when it was sent."""

    ttft: float
    latency: float
    prompt_tokens: int
    output_tokens: int
    text: str


def region_image(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A white crop with dark word boxes in lines (and ruled cells for a table): JPEG sizes like a
    real document crop's (the model's work depends only on the image size)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    line = max(12, min(32, height // 2))
    for top in range(line // 4, height - line // 2, line):
        left = int(rng.integers(4, 24))
        while left < width - 8:
            word = int(rng.integers(line // 2, 4 * line))
            draw.rectangle([left, top, min(left + word, width - 4), top + line * 2 // 3], fill=(30, 30, 40))
            left += word + line // 3
    if kind == "table":
        for x in range(0, width, max(40, width // 6)):
            draw.line([x, 0, x, height], fill=(90, 90, 90), width=2)
        for y in range(0, height, line):
            draw.line([0, y, width, y], fill=(90, 90, 90), width=2)
    return image


def make_regions(count: int, smoke: bool, seed: int = 0) -> list[Region]:
    rng = np.random.default_rng(seed)
    kinds = [MIX[i % len(MIX)] for i in range(count)]
    rng.shuffle(kinds)
    regions = []
    for kind in kinds:
        prompt, widths, heights, tokens = REGIONS[kind]
        width, height = (int(rng.integers(lo, hi + 1)) for lo, hi in (widths, heights))
        if smoke:
            width, height, tokens = max(28, width // SMOKE_SCALE), max(28, height // SMOKE_SCALE), SMOKE_TOKENS
        buffer = io.BytesIO()
        region_image(kind, width, height, rng).save(buffer, "JPEG", quality=90)
        regions.append(Region(kind, prompt, width, height, buffer.getvalue(), tokens))
    return regions


def request_body(region: Region) -> bytes:
    """The chat-completions body the glmocr SDK sends for one region, streamed."""
    uri = "data:image/jpeg;base64," + base64.b64encode(region.jpeg).decode()
    return json.dumps({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                  {"type": "text", "text": region.prompt}]}],
        "max_tokens": region.max_tokens, "temperature": 0.0, "top_p": 1e-5, "top_k": 1,
        "repetition_penalty": 1.1, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }).encode()


def cpu_config():
    """The tiny test checkpoint's config with GLM-OCR's 16k context: a page's prompt is ~5k tokens."""
    config = tiny_config()
    config.text_config.max_position_embeddings = 16384
    return config


def write_checkpoint(path: Path, real: bool) -> Path:
    """GLM-OCR's real config with random weights drawn on the GPU (real), else cpu_config()'s tiny
    checkpoint, written to `path`."""
    if not real:
        return build_checkpoint(path, cpu_config(), dtype=DTYPE)
    from glmrt_testing.random_weights import write_glm_ocr

    write_glm_ocr(path, device="cuda", dtype=DTYPE)
    torch.cuda.empty_cache()  # the weights drawn here stay cached otherwise, out of the server's KV cache
    return path


# ----------------------------------------------------------------------------- glmrt serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_on_sigterm(signum: int, frame) -> None:
    sys.exit(128 + signum)


@contextlib.contextmanager
def glmrt_server(model: Path, log_path: Path, *flags: str) -> Iterator[str]:
    """`glmrt serve MODEL SERVER_FLAGS FLAGS` on a free loopback port until the block ends; yields
    its base URL once it answers /health. The server is always stopped: it runs in this process's
    process group (a timeout that signals the group reaches it too), and while the block runs,
    SIGTERM to this process alone unwinds it (SystemExit) through the finally that stops it."""
    port = free_port()
    cmd = glmrt_command("serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                        "--log-level", "warning", *SERVER_FLAGS, *flags)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"glmrt serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"glmrt serve did not answer /health within {STARTUP_TIMEOUT_S:.0f} s")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            signal.signal(signal.SIGTERM, previous)  # unwinds once; a second SIGTERM acts as it did before
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def send(client: httpx.AsyncClient, body: bytes, region: Region) -> Record:
    """One streamed request; checks that it produced exactly its max_tokens tokens."""
    start = time.perf_counter()
    first, parts, usage, finish = None, [], None, None
    async with client.stream("POST", "/v1/chat/completions", content=body,
                             headers={"Content-Type": "application/json"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            for choice in chunk["choices"]:
                first = first or time.perf_counter()
                parts.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None or usage["completion_tokens"] != region.max_tokens or finish != "length":
        raise RuntimeError(f"a {region.kind} request ended with {finish!r} and usage {usage}, "
                           f"not 'length' after {region.max_tokens} tokens")
    return Record(first - start, end - start, usage["prompt_tokens"], usage["completion_tokens"], "".join(parts))


async def drive(url: str, regions: list[Region], concurrency: int) -> tuple[float, list[Record]]:
    """All regions, `concurrency` in flight at a time, in order; (wall seconds, records by region)."""
    bodies = [request_body(r) for r in regions]  # encoded beforehand: the client's work is not timed
    todo = iter(range(len(regions)))  # shared by the workers (one event loop: no lock needed)
    records: list[Record | None] = [None] * len(regions)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def worker() -> None:
            for i in todo:
                records[i] = await send(client, bodies[i], regions[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(regions)))))
        wall = time.perf_counter() - start
    return wall, records


def counter(url: str, name: str) -> float:
    """The value of an unlabelled metric of the server's /metrics, e.g. glmrt:num_preemptions_total."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise RuntimeError(f"/metrics has no {name}")


def preemptions(url: str) -> int:
    return int(counter(url, "glmrt:num_preemptions_total"))


# ----------------------------------------------------------------------------- transformers


class FirstTokenClock:
    """A generate() streamer that notes when the first new tokens come out (its first put() is the
    prompt; each put() copies the tokens to the host, so the time is after the device finished)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class Transformers:
    """transformers' GlmOcrForConditionalGeneration (sdpa, the server's dtype) fed the inputs of
    glmrt's processor, left-padded into a batch as transformers' processor pads one."""

    def __init__(self, path: Path):
        from transformers import GlmOcrForConditionalGeneration

        self.model = GlmOcrForConditionalGeneration.from_pretrained(
            path, dtype=DTYPE, attn_implementation="sdpa").to(DEVICE).eval()
        self.processor = glmrt.Processor.from_pretrained(path)
        config = ModelConfig.from_pretrained(path)
        self.pad_id = config.text.eos_token_ids[0]  # what GLM-OCR's processor pads with
        self.image_token_id = config.image_token_id

    def inputs(self, regions: list[Region]) -> dict:
        """input_ids and attention_mask (batch, longest prompt), the images' patches and grids."""
        processed = [self.processor(images=[load_image(r.jpeg)], prompt=r.prompt) for r in regions]
        width = max(len(p.input_ids) for p in processed)
        ids = torch.full((len(processed), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(processed):
            ids[row, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[row, width - len(p.input_ids):] = 1
        inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == self.image_token_id).int(),
                      pixel_values=torch.cat([p.pixel_values for p in processed]),
                      image_grid_thw=torch.cat([p.image_grid_thw for p in processed]))
        return {k: v.to(DEVICE) for k, v in inputs.items()}


def hf_run(hf: Transformers, regions: list[Region], batch: int) -> tuple[float, list[Record]]:
    """`regions` through transformers in padded batches of `batch`, each run to its longest
    request; times are from the start of the request's batch (when its client sent it)."""
    records = []
    start = time.perf_counter()
    for i in range(0, len(regions), batch):
        group = regions[i:i + batch]
        new_tokens = max(r.max_tokens for r in group)
        clock = FirstTokenClock()
        sent = time.perf_counter()
        with torch.inference_mode():
            inputs = hf.inputs(group)
            out = hf.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    repetition_penalty=1.1, streamer=clock)
        if CUDA:
            torch.cuda.synchronize()
        done = time.perf_counter()
        width = inputs["input_ids"].shape[1]
        for row, region in enumerate(group):
            ids = out[row, width:width + region.max_tokens].tolist()
            records.append(Record(clock.first - sent, done - sent, int(inputs["attention_mask"][row].sum()),
                                  len(ids), hf.processor.decode(ids, skip_special_tokens=True)))
    return time.perf_counter() - start, records


def hf_batched(hf: Transformers, regions: list[Region], batch: int) -> tuple[int, float, list[Record]]:
    """hf_run at the largest batch (from `batch`, halving) that fits in GPU memory."""
    while True:
        try:
            return batch, *hf_run(hf, regions, batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            torch.cuda.empty_cache()
            batch //= 2
            print(f"transformers: out of memory, batch {batch}")


# ----------------------------------------------------------------------------- report


def stats(run: str, concurrency: int, wall: float, records: list[Record], reference: list[Record]) -> dict:
    """A run's numbers; `same_text` counts the requests whose text equals the reference run's."""
    ms = lambda values, q: float(np.percentile(values, q) * 1e3)  # noqa: E731
    ttft, latency = [r.ttft for r in records], [r.latency for r in records]
    row = dict(run=run, concurrency=concurrency, requests=len(records), wall_s=wall,
               prompt_tokens=sum(r.prompt_tokens for r in records),
               output_tokens=sum(r.output_tokens for r in records),
               requests_per_s=len(records) / wall, output_tokens_per_s=sum(r.output_tokens for r in records) / wall,
               ttft_p50_ms=ms(ttft, 50), ttft_p99_ms=ms(ttft, 99),
               latency_p50_ms=ms(latency, 50), latency_p99_ms=ms(latency, 99),
               same_text=sum(r.text == ref.text for r, ref in zip(records, reference)))
    print(f"{run}, concurrency {concurrency}: {row['requests_per_s']:.3g} req/s, "
          f"{row['output_tokens_per_s']:.4g} tok/s, same text {row['same_text']}/{len(records)}")
    return row


def ratio(name: str, ours: dict, theirs: dict) -> dict:
    """glmrt over transformers: >1 is glmrt faster (throughputs ours/theirs, times theirs/ours)."""
    return dict(comparison=name, requests_per_s=ours["requests_per_s"] / theirs["requests_per_s"],
                output_tokens_per_s=ours["output_tokens_per_s"] / theirs["output_tokens_per_s"],
                ttft_p50=theirs["ttft_p50_ms"] / ours["ttft_p50_ms"],
                latency_p50=theirs["latency_p50_ms"] / ours["latency_p50_ms"],
                latency_p99=theirs["latency_p99_ms"] / ours["latency_p99_ms"])


def key_rows(ours: dict, theirs: dict | None, requests: int) -> list[dict]:
    """The key numbers: glmrt serve's run `ours`, transformers' padded batches `theirs` (None: not
    run yet, or not at all) as the peer."""
    where = f"{requests} region requests, {ours['concurrency']} in flight"
    dtype = str(DTYPE).removeprefix("torch.")

    def peer(field: str) -> dict:
        return dict(peer=theirs[field], peer_name=f"transformers {dtype} sdpa, padded batches of "
                    f"{theirs['concurrency']}") if theirs else {}

    return [key_row(f"glmrt serve output tokens/s, {where}", "tokens/s", ours["output_tokens_per_s"],
                    better="higher", **peer("output_tokens_per_s")),
            key_row(f"glmrt serve requests/s, {where}", "requests/s", ours["requests_per_s"], better="higher",
                    **peer("requests_per_s")),
            key_row(f"glmrt serve TTFT p50 (request sent -> first token), {where}", "ms", ours["ttft_p50_ms"],
                    **peer("ttft_p50_ms"))]


def markdown(meta: dict, regions: list[Region], rows: list[dict], ratios: list[dict]) -> list[str]:
    kinds = {k: sum(r.kind == k for r in regions) for k in REGIONS}
    mix = ", ".join(f"{n} {k} ({REGIONS[k][3] if not meta['smoke'] else SMOKE_TOKENS} tokens)"
                    for k, n in kinds.items() if n)
    lines = [f"# glmrt serve vs transformers on {meta['device']['name']}", "", provenance(meta),
             f"- checkpoint: {meta['checkpoint']}; `glmrt serve {meta['server_flags']}`",
             f"- {len(regions)} SDK-style region requests: {mix}; JPEG {sum(len(r.jpeg) for r in regions) / 1e3:.0f} kB "
             "in all; greedy, repetition_penalty 1.1, streamed",
             f"- the server answered /health {meta['server_start_s']:.1f} s after it was started; "
             f"preemptions in it: {meta['preemptions']}", "",
             "| run | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | "
             "latency p99 ms | same text |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['concurrency']} | {r['requests_per_s']:.3g} | {r['output_tokens_per_s']:.4g} | "
                     f"{r['ttft_p50_ms']:.4g} | {r['ttft_p99_ms']:.4g} | {r['latency_p50_ms']:.4g} | "
                     f"{r['latency_p99_ms']:.4g} | {r['same_text']}/{r['requests']} |")
    lines += ["", "Same text: glmrt rows against glmrt at the lowest concurrency, transformers rows against glmrt "
              "at the concurrency they are compared with (in bf16, batch shapes change the rounding, and random "
              "weights have near ties: some texts may differ)."]
    if ratios:
        lines += ["", "| glmrt / transformers | req/s | output tok/s | TTFT p50 | latency p50 | latency p99 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['comparison']} | {r['requests_per_s']:.2f}x | {r['output_tokens_per_s']:.2f}x | "
                  f"{r['ttft_p50']:.2f}x | {r['latency_p50']:.2f}x | {r['latency_p99']:.2f}x |" for r in ratios]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir or Hub id (default: built, see above)")
    parser.add_argument("--key", action="store_true",
                        help=f"the key numbers only: {KEY_REQUESTS} requests, {KEY_CONCURRENCY} in flight, "
                             "against transformers' padded batches")
    parser.add_argument("--requests", type=int,
                        help=f"region requests per run (default 32, 16 with --smoke, {KEY_REQUESTS} with --key)")
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help=f"requests in flight (default 1 8 32, {KEY_CONCURRENCY} with --key)")
    parser.add_argument("--baseline", choices=["transformers", "none"],
                        help="also run the requests through transformers (default on a GPU and with --key)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; a temp folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny requests of 4 tokens (numbers meaningless)")
    args = parser.parse_args(argv)
    count = args.requests if args.requests is not None else KEY_REQUESTS if args.key else 16 if args.smoke else 32
    levels = sorted(set(args.concurrency or ([KEY_CONCURRENCY] if args.key else [1, 8, 32])))
    baseline = args.baseline or ("transformers" if CUDA or args.key else "none")
    if count < 1 or levels[0] < 1:
        parser.error("--requests and --concurrency must be >= 1")
    regions = make_regions(count, args.smoke)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = CUDA and not args.smoke
        model = resolve_model_path(args.model) if args.model else write_checkpoint(tmp / "ckpt", real)
        checkpoint = str(args.model or ("GLM-OCR's real config, random weights" if real else "tiny test checkpoint"))
        started = time.perf_counter()
        with glmrt_server(model, tmp / "server.log") as url:
            server_start_s = time.perf_counter() - started
            print(f"glmrt serve answered /health after {server_start_s:.1f} s")
            # warm-up: every image size once (Triton specializations, allocator), 2 tokens each
            asyncio.run(drive(url, [dataclasses.replace(r, max_tokens=2) for r in regions], max(levels)))
            ours: dict[int, list[Record]] = {}
            for c in levels:
                wall, ours[c] = asyncio.run(drive(url, regions, c))
                rows.append(stats("glmrt serve", min(c, count), wall, ours[c], ours[levels[0]]))
            preempted = preemptions(url)
        top = rows[-1]  # glmrt at the highest concurrency
        key = key_rows(top, None, count)
        if baseline == "transformers":
            hf = Transformers(model)
            hf_run(hf, [dataclasses.replace(r, max_tokens=2) for r in regions[:4]], 4)  # warm-up
            if levels[0] == 1:
                wall, records = hf_run(hf, regions, 1)
                rows.append(stats("transformers, one at a time", 1, wall, records, ours[1]))
                ratios.append(ratio("concurrency 1 vs one at a time", rows[0], rows[-1]))
            batch, wall, records = hf_batched(hf, regions, top["concurrency"])
            rows.append(stats(f"transformers, batches of {batch}", batch, wall, records, ours[levels[-1]]))
            ratios.append(ratio(f"concurrency {top['concurrency']} vs batches of {batch}", top, rows[-1]))
            key = key_rows(top, rows[-1], count)
    meta = metadata(dtype=str(DTYPE).removeprefix("torch."), smoke=args.smoke, key_only=args.key, checkpoint=checkpoint,
                    server_flags=" ".join(SERVER_FLAGS), server_start_s=server_start_s, preemptions=preempted,
                    regions=[dict(kind=r.kind, width=r.width, height=r.height, jpeg_bytes=len(r.jpeg),
                                  max_tokens=r.max_tokens) for r in regions])
    lines = markdown(meta, regions, rows, ratios)
    print("\n".join(lines))
    write_report(output_dir(args.out, args.smoke), "serve", meta, dict(rows=rows, ratios=ratios, key=key), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
