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

# The options of a choice form one lexeme (an upper-case Lark rule: a regex alternation in the
# lexer), not alternatives of the start rule: the Earley parser refuses a row of more than 2,000
# items (llguidance's max_items_in_row), so a 2,500-option choice failed at its first token.
# Literal strings in llguidance's Lark dialect take JSON string syntax, so json.dumps quotes a choice.
_CHOICE_HEADER = "start: CHOICE\nCHOICE: "
# Size limits, checked before anything is compiled: compile time grows with the constraint's size
# (~1 s per 40,000 options or 1 MB of regex or schema on one core), and it is paid twice, by the
# validation here and by the request's matcher in the engine. At these limits it stays well under 1 s.
MAX_CHOICES = 10_000
MAX_CONSTRAINT_CHARS = 256 * 1024  # a regex, the options of a choice together, a schema's JSON text
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
        field = "json_schema"
        if _json_size(json_schema, MAX_CONSTRAINT_CHARS) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"SamplingParams.json_schema is more than {MAX_CONSTRAINT_CHARS} characters of JSON; "
                             "send a smaller schema")
        grammar = llg.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)
    elif json_object:
        field, grammar = "json_object", llg.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif regex is not None:
        field = "regex"
        if len(regex) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"SamplingParams.regex is {len(regex)} characters long; at most {MAX_CONSTRAINT_CHARS} "
                             "are allowed")
        grammar = llg.grammar_from_regex(regex)
    elif choice is not None:
        field = "choice"
        if len(choice) > MAX_CHOICES:
            raise ValueError(f"SamplingParams.choice has {len(choice)} options; at most {MAX_CHOICES} are allowed")
        size = sum(map(len, choice))
        if size > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"SamplingParams.choice has {size} characters in its options; at most "
                             f"{MAX_CONSTRAINT_CHARS} are allowed")
        grammar = llg.grammar_from_lark(_CHOICE_HEADER + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice))
    else:
        return None
    error = llg.validate_grammar(grammar)
    if error:
        raise ValueError(f"SamplingParams.{field} cannot be used as a constraint: {error.strip()}")
    return grammar


def _json_size(value: Any, limit: int) -> int:
    """About how many characters `value` takes as JSON (strings and keys by their length, quotes and
    separators included; any other value as one character), counted only until it passes `limit`,
    and without building the text (json.dumps would, in one call that holds the GIL)."""
    size, stack = 0, [value]
    while stack and size <= limit:
        item = stack.pop()
        size += 1
        if isinstance(item, dict):
            size += sum(len(key) + 3 for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            size += len(item) + 1
    return size


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

    def load(self) -> None:
        """Build the llguidance tokenizer now, not for the first constrained request: building it
        holds the GIL (~0.3-1 s), which a server does before it takes requests."""
        self._ll_tokenizer()

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
