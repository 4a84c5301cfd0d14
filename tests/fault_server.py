"""`python -m tests.fault_server serve ...`: `glmrt serve` with faults injected into single requests,
for tests/test_server_robustness.py (started with ServerProcess(..., launcher="tests.fault_server")).

A request whose prompt text contains one of the markers below fails at that point with a
RuntimeError, as an unexpected bug in the runtime would; every other request runs unchanged:
- FAIL_PREPARE: in LLMEngine.prepare (preprocessing, before the request is queued);
- FAIL_PREFILL: in ModelRunner.prefill, before anything of the step reaches the device;
- FAIL_DECODE: in ModelRunner.decode, once the request has two tokens (its first output has been
  delivered, so a stream has started).
"""
from __future__ import annotations

import sys

from glmrt.cli import main
from glmrt.engine.engine import LLMEngine
from glmrt.engine.runner import ModelRunner

FAIL_PREPARE, FAIL_PREFILL, FAIL_DECODE = "FAIL_PREPARE", "FAIL_PREFILL", "FAIL_DECODE"

_faults: dict[str, str] = {}  # request id -> its marker, from prepare until the request finishes
_prepare, _prefill, _decode, _release = LLMEngine.prepare, ModelRunner.prefill, ModelRunner.decode, LLMEngine._release


def _marker_of(engine: LLMEngine, prompt_token_ids: list[int]) -> str | None:
    text = engine.processor.tokenizer.decode(prompt_token_ids)
    return next((m for m in (FAIL_PREPARE, FAIL_PREFILL, FAIL_DECODE) if m in text), None)


def prepare(self: LLMEngine, *args, **kwargs):
    seq = _prepare(self, *args, **kwargs)
    marker = _marker_of(self, seq.prompt_token_ids)
    if marker == FAIL_PREPARE:
        raise RuntimeError(f"injected fault in prepare of {seq.request_id}")
    if marker is not None:
        _faults[seq.request_id] = marker
    return seq


def prefill(self: ModelRunner, step):
    failing = [s.request_id for s in step.seqs if _faults.get(s.request_id) == FAIL_PREFILL]
    if failing:
        raise RuntimeError(f"injected fault in the prefill of {failing}")
    return _prefill(self, step)


def decode(self: ModelRunner, step):
    failing = [s.request_id for s in step.seqs
               if _faults.get(s.request_id) == FAIL_DECODE and len(s.output_token_ids) >= 2]
    if failing:
        raise RuntimeError(f"injected fault in a decode step of {failing}")
    return _decode(self, step)


def release(self: LLMEngine, seq) -> None:
    """A finished request forgets its fault (the runner also releases a request whose shared
    prefill failed, to prefill it again alone: its fault must survive that)."""
    _faults.pop(seq.request_id, None)
    _release(self, seq)


LLMEngine.prepare, ModelRunner.prefill, ModelRunner.decode, LLMEngine._release = prepare, prefill, decode, release

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
