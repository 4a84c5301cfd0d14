"""EngineStats: what a driver or /metrics may know of the engine's load, as one immutable snapshot.

Drivers (the server's metrics, the document pipeline, the asyncio front) read this instead of the
scheduler, block manager or runner: those belong to the thread that steps the engine, and a
snapshot taken between two steps is consistent (its counts add up) where reads during a step
would not be.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int  # queued for their first step
    num_running: int  # admitted, as vLLM counts them: prefilling (chunk by chunk), decoding or draining
    kv_cache_usage: float  # share of KV-cache blocks in use, 0 to 1
    num_preemptions: int  # sequences preempted to free KV blocks, since the engine was built
    # Speculative decoding's counters (vLLM's names; SpecDecodeStats): zero, and an empty
    # per-position tuple, when the engine does not speculate.
    num_speculative_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()  # [k]: drafts accepted at position i
