"""Per-request generation settings, with vLLM's names and meanings."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 8192  # the model card's max_new_tokens for a full page
# Below this temperature a request is greedy, as in vLLM: dividing logits by a tiny temperature
# overflows to inf and the softmax turns into NaN.
GREEDY_TEMPERATURE = 1e-5
# torch.Generator.manual_seed accepts exactly this range.
SEED_RANGE = (-(2**63), 2**64)
# The sampler divides fp32 logits by the temperature and scales them by the repetition penalty
# (x / p, x * p): within these bounds every finite logit stays finite (a temperature of 1e39 is inf
# in fp32 and makes masked logits NaN; a penalty of 1e-39 is 0 and makes them inf). Beyond 1e4 the
# distribution is uniform for any logits a model gives.
MAX_TEMPERATURE = 1e4
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
DRAFT_SOURCES = ("auto", "mtp", "text", "ngram", "off")
OUTPUT_KINDS = ("stream", "final_only")
# The structured-output constraints (at most one per request), compiled by the engine.
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
# Size limits on a constraint, checked here, before the engine compiles anything: compile time grows
# with the constraint's size (~1 s per 40,000 options or 1 MB of regex or schema on one core); at
# these limits it stays well under 1 s.
MAX_CHOICES = 10_000
MAX_CONSTRAINT_CHARS = 256 * 1024  # a regex, a grammar, the options of a choice together, a schema's JSON text
MAX_WHITESPACE_PATTERN_CHARS = 1024


def _int(name: str, value: Any) -> int:
    """An int field: ints (numpy ints too), never bools or floats."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SamplingParams.{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _real(name: str, value: Any, rule: str) -> float:
    """A float field: finite ints or floats, never bools, strings, NaN or inf; `rule` describes the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SamplingParams.{name} must be a finite number {rule}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be a finite number {rule}, got {value}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"SamplingParams.{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


@dataclass
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # < GREEDY_TEMPERATURE = greedy (then top_k and top_p are off)
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # over prompt + generated tokens, as in transformers and vLLM
    stop: str | list[str] | None = None  # stop strings; a str becomes a one-element list
    stop_token_ids: list[int] | None = None  # in addition to the model's eos ids
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Log-probabilities (vLLM's meaning): None = off; N >= 0 = RequestOutput.logprobs gets, for
    # every generated token, the log-probability of that token and of the N most likely ones under
    # the model's raw distribution (before the structured-output mask, the repetition penalty and
    # temperature). N is bounded by the engine's max_logprobs.
    logprobs: int | None = None
    # Structured outputs (vLLM's meanings; at most one): the output is JSON valid against the
    # schema (a dict or its JSON text), any JSON object, a full match of the regex, exactly one of
    # the strings in `choice`, or a sentence of `grammar` (llguidance's Lark dialect, or llama.cpp's
    # GBNF, which vLLM calls EBNF: a grammar with a `start:` rule or a `%llguidance` line is Lark,
    # any other is converted from GBNF). The engine compiles the constraint when it prepares the request.
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # JSON (json_schema, json_object) is written compactly by default, in json.dumps's layout (", "
    # and ": ", no other whitespace outside strings); a regex here allows its matches between JSON
    # tokens instead (vLLM's whitespace_pattern), e.g. r"[ \n]{0,8}".
    whitespace_pattern: str | None = None
    # Speculative decoding's draft source (engines started with num_speculative_tokens > 0; the
    # output is the same whatever drafts): "auto" (the reference text where it has a proposal, else
    # the MTP layer, or n-gram lookup over the output so far on an engine without it), or only
    # "mtp", "text", "ngram", or "off". reference_text: text the output is expected to repeat for the most part
    # (e.g. the PDF text layer of the region being read), matched against the output's tail and
    # its continuation proposed as drafts.
    draft: str = "auto"
    reference_text: str | None = None
    # Which outputs a request gets: "stream", one every step that reads tokens of it back (deltas
    # and the whole output so far); "final_only", one when it finishes (vLLM's
    # RequestOutputKind.FINAL_ONLY, what LLM.generate uses): no per-step output is built, and
    # without stop strings no text either until the end (the final text is the same).
    output_kind: str = "stream"

    def __post_init__(self) -> None:
        self.max_tokens = _int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        self.temperature = _real("temperature", self.temperature, f"in [0, {MAX_TEMPERATURE:g}]")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"SamplingParams.temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], "
                             f"got {self.temperature}")
        self.top_k = _int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        self.top_p = _real("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be a finite number in (0, 1], got {self.top_p}")
        low, high = REPETITION_PENALTY_RANGE
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty, f"in [{low:g}, {high:g}]")
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"SamplingParams.repetition_penalty must be a finite number in [{low:g}, {high:g}], "
                             f"got {self.repetition_penalty}")
        if self.stop is not None:
            stop = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stop, (list, tuple)):
                raise TypeError(
                    f"SamplingParams.stop must be a str or a list of str, got {type(self.stop).__name__} {self.stop!r}"
                )
            bad = [s for s in stop if not isinstance(s, str) or not s]
            if bad:
                raise ValueError(
                    f"SamplingParams.stop must hold non-empty strings, got {self.stop!r} (bad: {bad[0]!r})"
                )
            self.stop = list(stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise TypeError(
                    f"SamplingParams.stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__} "
                    f"{self.stop_token_ids!r}"
                )
            bad = [t for t in self.stop_token_ids
                   if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0]
            if bad:
                raise ValueError(
                    f"SamplingParams.stop_token_ids must hold non-negative ints, got {self.stop_token_ids!r} "
                    f"(bad: {bad[0]!r})"
                )
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", self.include_stop_str_in_output)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValueError(f"SamplingParams.logprobs must be None (off) or an int >= 0, got {self.logprobs}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
                raise ValueError(f"SamplingParams.seed must be in [-2**63, 2**64), got {self.seed}")
        if self.draft not in DRAFT_SOURCES:
            raise ValueError(f"SamplingParams.draft must be one of {', '.join(DRAFT_SOURCES)}, got {self.draft!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"SamplingParams.output_kind must be one of {', '.join(OUTPUT_KINDS)}, "
                             f"got {self.output_kind!r}")
        if self.reference_text is not None and not isinstance(self.reference_text, str):
            raise TypeError(f"SamplingParams.reference_text must be a str or None, got "
                            f"{type(self.reference_text).__name__} {self.reference_text!r:.80}")
        self._check_constraint()
        if self.greedy:
            self.top_k, self.top_p = 0, 1.0  # greedy ignores them; keep the object saying so

    def _check_constraint(self) -> None:
        """Types and sizes of the constraint fields; whether the constraint compiles is the engine's
        to find out (SamplingParams is a plain value: it imports no grammar library)."""
        self.json_object = _bool("json_object", self.json_object)
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"SamplingParams takes at most one of {', '.join(CONSTRAINTS)}, got {' and '.join(given)}")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"SamplingParams.json_schema is not valid JSON: {exc}") from None
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise TypeError(f"SamplingParams.json_schema must be a JSON Schema object (a dict or its JSON text), "
                                f"got {type(self.json_schema).__name__} {self.json_schema!r:.80}")
            if _json_size("json_schema", self.json_schema, MAX_CONSTRAINT_CHARS) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"SamplingParams.json_schema is more than {MAX_CONSTRAINT_CHARS} characters of JSON; "
                                 "send a smaller schema")
        for name in ("regex", "grammar"):
            text = getattr(self, name)
            if text is not None and (not isinstance(text, str) or not text):
                raise TypeError(f"SamplingParams.{name} must be a non-empty str, got {type(text).__name__} "
                                f"{text!r:.80}")
            if text is not None and len(text) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"SamplingParams.{name} is {len(text)} characters long; at most "
                                 f"{MAX_CONSTRAINT_CHARS} are allowed")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise TypeError(f"SamplingParams.choice must be a non-empty list of non-empty strings, "
                                f"got {self.choice!r:.80}")
            self.choice = list(self.choice)
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"SamplingParams.choice has {len(self.choice)} options; at most {MAX_CHOICES} are "
                                 "allowed")
            size = sum(map(len, self.choice))
            if size > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"SamplingParams.choice has {size} characters in its options; at most "
                                 f"{MAX_CONSTRAINT_CHARS} are allowed")
        if self.whitespace_pattern is not None:
            pattern = self.whitespace_pattern
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"SamplingParams.whitespace_pattern must be a non-empty str (a regex), got "
                                f"{type(pattern).__name__} {pattern!r:.80}")
            if len(pattern) > MAX_WHITESPACE_PATTERN_CHARS:
                raise ValueError(f"SamplingParams.whitespace_pattern is {len(pattern)} characters long; at most "
                                 f"{MAX_WHITESPACE_PATTERN_CHARS} are allowed")
            if self.constraint not in ("json_schema", "json_object"):
                raise ValueError("SamplingParams.whitespace_pattern applies to JSON output: it needs json_schema or "
                                 f"json_object, got {self.constraint or 'no constraint'}")

    @property
    def constraint(self) -> str | None:
        """The name of the structured-output field this request sets, or None."""
        return next((name for name in CONSTRAINTS if getattr(self, name) not in (None, False)), None)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _json_size(name: str, value: Any, limit: int) -> int:
    """About how many characters `value` takes as JSON (strings and keys by their length, quotes and
    separators included; any other value as one character), counted only until it passes `limit`,
    and without building the text (json.dumps would, in one call that holds the GIL). TypeError
    naming field `name` for a value JSON cannot hold (the engine keys its grammar cache on the JSON text)."""
    size, stack = 0, [value]
    while stack and size <= limit:
        item = stack.pop()
        size += 1
        if isinstance(item, dict):
            bad = next((key for key in item if not isinstance(key, str)), None)
            if bad is not None:
                raise TypeError(f"SamplingParams.{name} has the key {bad!r:.40}; JSON object keys are strings")
            size += sum(len(key) + 3 for key in item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str):
            size += len(item) + 1
        elif isinstance(item, float) and not math.isfinite(item):
            raise TypeError(f"SamplingParams.{name} holds {item}, which is not a JSON number")
        elif item is not None and not isinstance(item, (bool, int, float)):
            raise TypeError(f"SamplingParams.{name} holds {type(item).__name__} {item!r:.40}, which is not JSON")
    return size
