"""Prometheus metrics of one server (its own registry, so several apps in one process do not mix).

Engine state (queue, running sequences, KV-cache usage, preemptions) is read when /metrics is
scraped, from the snapshot the engine's thread published after its last step; request events
(HTTP status, finish reason, tokens, latencies; pictures made and the time of each stage for
GLM-Image) are counted as they happen.
Names follow vLLM's with the `glmrt:` prefix.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)


class EngineCollector:
    """Gauges and counters read at scrape time from the engine's last published snapshot
    (AsyncEngine.stats(): the engine itself belongs to the thread that steps it)."""

    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        s = self.async_engine.stats()
        waiting = GaugeMetricFamily("glmrt:num_requests_waiting", "Requests queued for their first step.")
        waiting.add_metric([], s.num_waiting)
        yield waiting
        # As vLLM's: every request the scheduler has admitted (its prompt being prefilled, chunk by
        # chunk, or decoding), not only those holding a decode row.
        running = GaugeMetricFamily("glmrt:num_requests_running", "Requests admitted to the engine, prefilling or "
                                    "decoding.")
        running.add_metric([], s.num_running)
        yield running
        usage = GaugeMetricFamily("glmrt:kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).")
        usage.add_metric([], s.kv_cache_usage)
        yield usage
        preempted = CounterMetricFamily("glmrt:num_preemptions", "Sequences preempted to free KV blocks.")
        preempted.add_metric([], s.num_preemptions)
        yield preempted
        if s.num_speculative_tokens:  # vLLM's speculative-decoding counters
            for name, doc, value in (
                ("num_drafts", "Sequences verified by speculative steps (one per sequence per step).", s.num_drafts),
                ("num_draft_tokens", "Draft tokens proposed.", s.num_draft_tokens),
                ("num_accepted_tokens", "Draft tokens accepted.", s.num_accepted_tokens),
            ):
                counter = CounterMetricFamily(f"glmrt:spec_decode_{name}", doc)
                counter.add_metric([], value)
                yield counter
            per_pos = CounterMetricFamily("glmrt:spec_decode_num_accepted_tokens_per_pos",
                                          "Draft tokens accepted, by position in the draft.", labels=["position"])
            for position, value in enumerate(s.accepted_per_position):
                per_pos.add_metric([str(position)], value)
            yield per_pos


class ServerMetrics:
    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("glmrt:http_requests", "HTTP requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter("glmrt:request_success", "Engine requests finished, by finish reason.",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("glmrt:prompt_tokens", "Prompt tokens of requests admitted to the engine.",
                                     registry=r)
        self.generation_tokens = Counter("glmrt:generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("glmrt:time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("glmrt:inter_token_latency_seconds", "Time between outputs of one request, per token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("glmrt:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        # GLM-Image (POST /v1/images/*): per request, its n images together
        self.images = Counter("glmrt:images_generated", "Pictures made, by endpoint (generations, edits).",
                              ["endpoint"], registry=r)
        self.image_ar_seconds = Histogram("glmrt:image_ar_stage_seconds", "The AR stage of an images request: its n "
                                          "images' token grids, decoded in the engine's batch.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.image_queue_seconds = Histogram("glmrt:image_diffusion_queue_seconds", "Time an images request waited "
                                             "for the diffusion worker.", buckets=LATENCY_BUCKETS, registry=r)
        self.image_diffusion_seconds = Histogram("glmrt:image_diffusion_stage_seconds", "The diffusion stage (DiT "
                                                 "and VAE) of an images request.", buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(async_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Feeds one request's outputs into the metrics: tokens, TTFT, inter-token latency, end-to-end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last: float | None = None
        self.prompt_counted = False
        self.num_tokens = 0  # generated tokens counted so far (the final stop token has no delta)
        self.ended = False  # its finish reason has been counted

    def observe(self, out: RequestOutput) -> None:
        m, now = self.metrics, time.monotonic()
        if not self.prompt_counted:
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            self.prompt_counted = True
        # Deltas while streaming (reading token_ids would copy the whole output every step); the
        # final output's token_ids also count a stop token, which has no delta.
        n = len(out.token_ids) - self.num_tokens if out.finished else len(out.delta_token_ids)
        self.num_tokens += n
        if n:
            m.generation_tokens.inc(n)
            if self.last is None:  # the engine read the first token at first_token_time (well before now, when final only)
                first = now if out.first_token_time is None else out.first_token_time
                m.ttft.observe(first - self.arrival)
                if n > 1:  # the tokens after it, in the same output
                    m.itl.observe((now - first) / (n - 1))
            else:
                m.itl.observe((now - self.last) / n)
            self.last = now
        if out.finished:
            self.end(out.finish_reason)
            m.e2e.observe(now - self.arrival)

    def end(self, finish_reason: str) -> None:
        """Counts the request's finish reason once; also for a request that ends without a final
        output: its client left ("abort") or its step failed ("error")."""
        if not self.ended:
            self.ended = True
            self.metrics.finished.labels(finish_reason).inc()
