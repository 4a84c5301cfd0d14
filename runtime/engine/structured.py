"""Structured outputs: grammars from SamplingParams, and per-row token bitmasks from llguidance.

A constrained request (json_schema, json_object, regex or choice) carries an llguidance matcher.
Every token read back for it is fed to its matcher; before a step samples its token, the host
asks the matcher which tokens may come next and writes a bitmask row (bit v % 32 of int32 word
v // 32 set = token v allowed) that the device applies to the logits before the penalty,
temperature and the draw. In a decode step the masks are computed while the device runs the
decoder forward (the runner launches the forward, the engine reads the previous step's tokens,
advances the matchers and fills the masks, then the runner launches the sampling), so the host
work hides behind the forward instead of serialising the overlapped steps. Steps without a
constrained row run exactly as before.

When a grammar is complete only the end-of-sequence tokens stay allowed, so a constrained request
ends the way an unconstrained one does: with an eos token (finish_reason "stop").

llguidance was chosen over xgrammar: it has no dependencies (xgrammar pulls in transformers,
which glmrt does not use at run time), it builds its tokenizer from the checkpoint's
tokenizer.json directly, computes a mask in tens of microseconds on the host into any buffer we
hand it (pinned memory here), and its JSON compiler covers the JSON Schema features extraction
templates need.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

# Literal strings in llguidance's Lark dialect take JSON string syntax, so json.dumps quotes a choice.
_LARK_HEADER = "start: "
# JSON may be laid out freely (the model's habit is the template's 4-space indentation), but each
# run of whitespace is bounded: unbounded runs let a model loop on whitespace until max_tokens.
# A schema's own "x-guidance" options override this.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,48}"}


def _llguidance():
    import llguidance

    return llguidance


def build_grammar(json_schema: dict | None = None, json_object: bool = False, regex: str | None = None,
                  choice: list[str] | None = None) -> str | None:
    """The llguidance grammar for one request's constraint (at most one is set) or None;
    ValueError naming the SamplingParams field when the constraint is malformed."""
    llg = _llguidance().LLMatcher
    if json_schema is not None:
        field, grammar = "json_schema", llg.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)
    elif json_object:
        field, grammar = "json_object", llg.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif regex is not None:
        field, grammar = "regex", llg.grammar_from_regex(regex)
    elif choice is not None:
        field = "choice"
        grammar = llg.grammar_from_lark(_LARK_HEADER + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice))
    else:
        return None
    error = llg.validate_grammar(grammar)
    if error:
        raise ValueError(f"SamplingParams.{field} cannot be used as a constraint: {error.strip()}")
    return grammar


class GrammarRejected(RuntimeError):
    """A constrained request's token was not allowed by its grammar (it cannot happen when the mask
    was applied; kept as a clear failure of that request rather than silent invalid output)."""


class StructuredOutputs:
    """The engine's llguidance state: one tokenizer (built on first use, ~0.1-1 s) and a thread
    pool for computing many rows' masks at once."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_token_ids: list[int]):
        self._tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self.mask_words = (vocab_size + 31) // 32
        self._eos_token_ids = list(eos_token_ids)
        self._tokenizer = None
        self._executor = None
        self._lock = threading.Lock()  # prepare() runs on worker threads

    def _ll_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                self._tokenizer = llg.LLTokenizer(self._tokenizer_file.read_text(encoding="utf-8"),
                                                  n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
                self._executor = llg.LLExecutor()
            return self._tokenizer

    def matcher(self, grammar: str, request_id: str) -> Any:
        """A fresh matcher for one request (at the start of its output)."""
        llg = _llguidance()
        matcher = llg.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"request {request_id}: the constraint cannot be compiled: {matcher.get_error()}")
        return matcher

    def accept(self, matcher: Any, token: int) -> bool:
        """Advance a request's matcher by its newly read token -> whether this token ends the
        request's constraint (an eos after a complete grammar; it matters when eos does not stop
        the request, i.e. ignore_eos). Raises GrammarRejected."""
        if not matcher.consume_token(token):
            # llguidance's error is followed by its state and the whole grammar: keep the first line.
            why = (matcher.get_error() or "").strip().splitlines()[:1]
            raise GrammarRejected(f"token {token} is not allowed by the request's constraint"
                                  + (f": {why[0][:300]}" if why else ""))
        return token in self._eos_token_ids and matcher.is_stopped()

    def fill_masks(self, matchers: list[Any | None], pin: bool) -> torch.Tensor | None:
        """[len(matchers), W] int32 host bitmask (pinned when `pin`): row i from matchers[i], or all
        ones (no constraint) where it is None; None when no row is constrained."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        masks = torch.full((len(matchers), self.mask_words), -1, dtype=torch.int32, pin_memory=pin)
        row_bytes = self.mask_words * 4
        if len(rows) == 1:
            matcher, i = rows[0]
            matcher.unsafe_compute_mask_ptr(masks[i].data_ptr(), row_bytes)
        else:
            self._executor.unsafe_compute_mask_ptr(rows, masks.data_ptr(), row_bytes, len(matchers))
        return masks
