"""Structured outputs: grammars from SamplingParams, and per-row token bitmasks from llguidance.

A constrained request (json_schema, json_object, regex, choice or grammar) carries an llguidance
matcher, a copy of its constraint's compiled matcher, which the engine keeps in an LRU cache keyed
by the constraint's text (a schema sent with every page compiles once). Every token read back for
the request is fed to its matcher; before a step samples its token, the host asks the matcher
which tokens may come next and writes a bitmask row (bit v % 32 of int32 word v // 32 set = token
v allowed) that the device applies to the logits before the penalty, temperature and the draw.
In a decode step the masks are computed while the device runs the decoder forward (the runner
launches the forward, the engine reads the previous step's tokens, advances the matchers and
fills the masks, then the runner launches the sampling), so the host work hides behind the
forward instead of serialising the overlapped steps. Steps without a constrained row run
exactly as before.

When a grammar is complete only the end-of-sequence tokens stay allowed, so a constrained request
ends the way an unconstrained one does: with an eos token (finish_reason "stop").

llguidance was chosen over xgrammar: it has no dependencies (xgrammar pulls in transformers,
which glmrt does not use at run time), it builds its tokenizer from the checkpoint's
tokenizer.json directly, computes a mask in tens of microseconds on the host into any buffer we
hand it (pinned memory here), and its JSON compiler covers the JSON Schema features extraction
templates need.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from pathlib import Path
from typing import Any

import torch

from ..sampling_params import SamplingParams

# The options of a choice form one lexeme (an upper-case Lark rule: a regex alternation in the
# lexer), not alternatives of the start rule: the Earley parser refuses a row of more than 2,000
# items (llguidance's max_items_in_row), so a 2,500-option choice failed at its first token.
# Literal strings in llguidance's Lark dialect take JSON string syntax, so json.dumps quotes a choice.
_CHOICE_HEADER = "start: CHOICE\nCHOICE: "
# JSON is written in json.dumps's layout (", " between items, ": " after keys, no whitespace
# elsewhere outside strings), so a JSON output equals json.dumps(json.loads(output),
# ensure_ascii=False) but for numbers and \u escapes, which keep the model's spelling (1.50, 1e2,
# \u001F). Free whitespace let random weights (and a real model's habit of indenting) spend
# max_tokens on runs of tabs and spaces, even when each run was bounded. Whitespace is had by asking:
# SamplingParams.whitespace_pattern, or a schema's own "x-guidance" options.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled constraints kept (LRU): extraction clients send the same schema with every page.
GRAMMAR_CACHE_SIZE = 256
# llguidance follows an error with an excerpt of the grammar ("   3 | start: foo" and a caret line).
_EXCERPT = re.compile(r"^\s*\d+ \|")


def _llguidance():
    import llguidance

    return llguidance


def constraint_key(params: SamplingParams) -> tuple[str, str, str | None] | None:
    """What identifies a request's compiled constraint: (SamplingParams field, its canonical text,
    whitespace_pattern); None without a constraint. A schema's text is json.dumps without sort_keys:
    llguidance writes properties in the schema's order, so two orders are two grammars."""
    kind = params.constraint
    if kind is None:
        return None
    if kind == "json_object":
        text = '{"type": "object"}'
    elif kind in ("json_schema", "choice"):
        text = json.dumps(getattr(params, kind), ensure_ascii=False)
    else:
        text = getattr(params, kind)
    return kind, text, params.whitespace_pattern


def build_grammar(kind: str, text: str, whitespace_pattern: str | None = None) -> str:
    """The llguidance grammar of a constraint_key (not yet compiled); ValueError naming the
    SamplingParams field for a grammar that is neither Lark nor GBNF."""
    llg = _llguidance()
    if kind in ("json_schema", "json_object"):
        options = COMPACT_JSON if whitespace_pattern is None else {"whitespace_pattern": whitespace_pattern}
        return llg.LLMatcher.grammar_from_json_schema(text, defaults=options)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark(_CHOICE_HEADER + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                            for c in json.loads(text)))
    try:  # "grammar": llguidance tells Lark (a `start:` rule or a `%llguidance` line) from GBNF, which it converts
        return llg.grammar_from("grammar", text)
    except ValueError as exc:
        raise ValueError(f"SamplingParams.grammar has no `start:` rule, so it was read as GBNF: "
                         f"{_first_error(str(exc))}") from None


def _first_error(error: str) -> str:
    """llguidance's error message without the excerpt of the grammar that follows it."""
    lines = error.strip().splitlines()
    cut = next((i for i, line in enumerate(lines) if _EXCERPT.match(line)), len(lines))
    return "\n".join(lines[:cut]).strip()[:1000]


class GrammarRejected(RuntimeError):
    """A constrained request's token was not allowed by its grammar (it cannot happen when the mask
    was applied; kept as a clear failure of that request rather than silent invalid output)."""


class StructuredOutputs:
    """The engine's llguidance state: one tokenizer (built on first use, ~0.1-1 s), the compiled
    constraints, and a thread pool for computing many rows' masks at once."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_token_ids: list[int]):
        self._tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self.mask_words = (vocab_size + 31) // 32
        self._eos_token_ids = list(eos_token_ids)
        self._tokenizer = None
        self._executor = None
        self._lock = threading.Lock()  # prepare() runs on worker threads
        # constraint_key -> a matcher at the start of its grammar, never advanced: each request gets
        # a deep copy (~10 us; compiling is ~1-10 ms for a page's schema). lru_cache is thread-safe;
        # two threads missing on one key at once both compile it, and one result is kept.
        self._compiled = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

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

    def compile(self, params: SamplingParams) -> None:
        """Compile `params`' constraint into the cache, unless it is there (or there is none);
        ValueError naming the SamplingParams field when it does not compile. The server calls this
        while it parses a request (under its grammar timeout); matcher() then finds it compiled."""
        key = constraint_key(params)
        if key is not None:
            self._compiled(key)

    def matcher(self, params: SamplingParams) -> Any:
        """A fresh matcher for one request's constraint (at the start of its output), or None;
        ValueError as compile()."""
        key = constraint_key(params)
        return None if key is None else self._compiled(key).deep_copy()

    def _compile(self, key: tuple[str, str, str | None]) -> Any:
        kind, text, whitespace_pattern = key
        llg = _llguidance()
        if whitespace_pattern is not None:  # checked alone, so that its error names it
            error = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_regex(whitespace_pattern))
            if error:
                raise ValueError(f"SamplingParams.whitespace_pattern is not a regex llguidance takes: "
                                 f"{_first_error(error)}")
        matcher = llg.LLMatcher(self._ll_tokenizer(), build_grammar(kind, text, whitespace_pattern), log_level=0)
        if matcher.is_error():
            raise ValueError(f"SamplingParams.{kind} cannot be used as a constraint: "
                             f"{_first_error(matcher.get_error())}")
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

    def fill_masks(self, matchers: list[Any | None], pin: bool, drafts: list[list[int]] | None = None,
                   positions: int = 1) -> torch.Tensor | None:
        """[len(matchers), W] int32 host bitmask (pinned when `pin`): row i from matchers[i], or all
        ones (no constraint) where it is None; None when no row is constrained. With drafts (a
        speculative step: each row's drafts, at most positions - 1): [len(matchers), positions, W],
        row i's mask at its next token then after each of its drafts, while its grammar allows
        them (llguidance advances the matcher through them and rolls it back); the positions
        after a draft the grammar refuses stay all ones (the refused draft is masked out at its
        own position, so they are never reached)."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        shape = (len(matchers), self.mask_words) if drafts is None else (len(matchers), positions, self.mask_words)
        masks = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        row_bytes = self.mask_words * 4
        if drafts is not None:  # llguidance takes no empty drafts: those rows' one position as below
            drafting = [(m, i * positions, drafts[i]) for m, i in rows if drafts[i]]
            if drafting:
                self._executor.unsafe_compute_mask_ptr_with_draft_token(
                    drafting, masks.data_ptr(), row_bytes, len(matchers) * positions)
            rows = [(m, i * positions) for m, i in rows if not drafts[i]]
        if len(rows) == 1:
            matcher, i = rows[0]
            matcher.unsafe_compute_mask_ptr(masks.data_ptr() + i * row_bytes, row_bytes)
        elif rows:
            self._executor.unsafe_compute_mask_ptr(rows, masks.data_ptr(), row_bytes, masks.numel() // self.mask_words)
        return masks
