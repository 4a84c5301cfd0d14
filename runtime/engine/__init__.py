"""The engine: requests in, outputs out, one scheduler step at a time.

- input processing: inputs.py (a request -> a Sequence, per model family), structured.py (its
  constraint compiled), drafters.py (where its speculative drafts come from);
- the core: engine.py (LLMEngine: schedule, launch, read), scheduler.py and block_manager.py (who
  runs and where its KV lives), runner.py with graphs.py, sampler.py, spec_decode.py (the device
  side of a step);
- output processing: request_state.py (a request's text, stop strings and outputs), detokenizer.py,
  stop.py;
- drivers' surface: LLMEngine (add_request, abort, step, stats), AsyncEngine (async_engine.py, the
  engine stepping on a thread of its own, core.py), Sequence (what `prepare` returns), EngineStats.
"""

from .async_engine import AsyncEngine, RequestFailed, gather_or_cancel
from .engine import EngineConfig, LLMEngine
from .sequence import Sequence
from .stats import EngineStats

__all__ = ["AsyncEngine", "EngineConfig", "EngineStats", "LLMEngine", "RequestFailed", "Sequence", "gather_or_cancel"]
