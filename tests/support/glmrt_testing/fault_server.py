"""`python -m glmrt_testing.fault_server serve ...`: `glmrt serve` with faults injected into single requests,
for tests/test_server_robustness.py (started with ServerProcess(..., launcher="glmrt_testing.fault_server")).

A request whose prompt text contains one of the markers below fails at that point with a
RuntimeError, as an unexpected bug in the runtime would; every other request runs unchanged:
- FAIL_PREPARE: in LLMEngine.prepare (preprocessing, before the request is queued);
- FAIL_PREFILL: in the prefill inputs of a step holding one of its chunks (ModelRunner's
  _prefill_inputs: host work and vision pass, before anything of the step changes on the device;
  the step's decode rows, if any, then run on);
- FAIL_DECODE: in a decode step (ModelRunner.launch of a step without prefill chunks), once the
  request has two tokens (its first output has been delivered,
  so a stream has started).

Importing this module changes nothing (test_server_robustness.py imports its markers); the faults
are installed only when it runs as the server's main module.
"""
from __future__ import annotations

import sys

from glmrt.cli import main
from glmrt.engine.engine import LLMEngine
from glmrt.engine.runner import ModelRunner

FAIL_PREPARE, FAIL_PREFILL, FAIL_DECODE = "FAIL_PREPARE", "FAIL_PREFILL", "FAIL_DECODE"

_faults: dict[str, str] = {}  # request id -> its marker, from prepare until the request finishes
_prepare, _prefill_inputs, _release = LLMEngine.prepare, ModelRunner._prefill_inputs, LLMEngine._release
_launch = ModelRunner.launch


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


def prefill_inputs(self: ModelRunner, step):
    failing = [c.seq.request_id for c in step.chunks if _faults.get(c.seq.request_id) == FAIL_PREFILL]
    if failing:
        raise RuntimeError(f"injected fault in the prefill of {failing}")
    return _prefill_inputs(self, step)


def launch(self: ModelRunner, step, *args, **kwargs):
    """A decode step fails for a FAIL_DECODE request that has two tokens."""
    failing = [s.request_id for s in step.seqs
               if not step.chunks and _faults.get(s.request_id) == FAIL_DECODE and len(s.output_token_ids) >= 2]
    if failing:
        raise RuntimeError(f"injected fault in a decode step of {failing}")
    return _launch(self, step, *args, **kwargs)


def release(self: LLMEngine, seq) -> None:
    """A finished request forgets its fault."""
    _faults.pop(seq.request_id, None)
    _release(self, seq)


if __name__ == "__main__":
    LLMEngine.prepare, LLMEngine._release = prepare, release
    ModelRunner._prefill_inputs, ModelRunner.launch = prefill_inputs, launch
    sys.exit(main(sys.argv[1:]))
