"""OpenAI request bodies -> glmrt requests, and glmrt outputs -> OpenAI response bodies.

Parsing is plain validation of the decoded JSON (no schema library): every problem becomes an
`APIError` that names the offending field the way OpenAI does (`messages[0].content[1].image_url`),
answered as HTTP 400 with an OpenAI-style error body. Field semantics follow vLLM's server:
`null` means "not set"; non-OpenAI sampling fields (`top_k`, `repetition_penalty`, `stop_token_ids`,
`ignore_eos`, `skip_special_tokens`, `include_stop_str_in_output`) are accepted at the top level,
as are glmrt's speculative-decoding extensions `reference_text` (text the answer is expected to
repeat for the most part, e.g. a PDF's text layer: drafts are taken from it) and `draft`;
fields glmrt does not implement are refused only when they ask for something (`n: 2`,
`echo: true`), and names it does not know are ignored, as vLLM ignores them.

Log-probabilities (of the model's raw distribution, SamplingParams.logprobs): chat's
`logprobs: true` with `top_logprobs` alternatives (0 to the server's max_logprobs, 20 by default;
`top_logprobs` > 0 needs `logprobs: true`) and the legacy completions' `logprobs: N`, answered in
OpenAI's shapes (server/logprobs.py), in a stream chunk by chunk with the tokens of each chunk.

Structured outputs come in three spellings, all mapped onto SamplingParams' constraint fields:
OpenAI's `response_format` ({"type": "json_schema", "json_schema": {"schema": ...}} or
{"type": "json_object"}), vLLM's `structured_outputs` ({"json" | "regex" | "choice" | "grammar" |
"json_object": ...}, with "whitespace_pattern" for JSON) and vLLM's older `guided_json` /
`guided_regex` / `guided_choice` / `guided_grammar` / `guided_whitespace_pattern`. A JSON schema may
also be the model card's example template (`{"name": "", "items": [{"price": ""}]}`). The server
compiles a request's constraint (`compile_constraint`) before it hands the request to the engine,
so that its errors name the request field and it runs under the server's grammar timeout.

Text is checked before anything is tokenized: every string must be valid Unicode (JSON may carry a
lone surrogate such as "\\ud800", which UTF-8 and the tokenizer cannot take), and the prompt's text
as a whole must fit in max_model_len tokens, given how many characters one token covers at most
(`PromptLimit`): a 16 MB text is refused as it is parsed, never tokenized.
"""
from __future__ import annotations

import numbers
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..extraction import as_json_schema
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 408: "RequestTimeoutError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.headers = message, param, status, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


# Request field -> SamplingParams field. max_completion_tokens is OpenAI's newer name for max_tokens.
SAMPLING_FIELDS = {
    "max_completion_tokens": "max_tokens", "max_tokens": "max_tokens", "temperature": "temperature",
    "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed",
    "stop": "stop", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens", "include_stop_str_in_output": "include_stop_str_in_output",
    "reference_text": "reference_text", "draft": "draft",
}
# A reference text longer than this cannot be what one answer repeats (max_model_len tokens at most).
MAX_REFERENCE_CHARS = 1 << 20
# OpenAI fields glmrt does not implement, with the values that ask for nothing (accepted).
INERT_VALUES = {
    "n": (1,), "best_of": (1,), "echo": (False,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "suffix": ("",), "min_tokens": (0,),
    "parallel_tool_calls": (False, True),
}
ROLES = ("system", "developer", "user", "assistant")
# Structured-output request fields -> SamplingParams constraint fields (response_format aside).
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                           "json_object": "json_object"}
# The request fields of SamplingParams.whitespace_pattern (flexible whitespace in JSON output).
WHITESPACE_FIELDS = ("guided_whitespace_pattern", "structured_outputs.whitespace_pattern")


@dataclass
class ImageRef:
    url: str  # a data URI, http(s) URL or file:// URL, resolved by the MediaLoader
    param: str  # where it came from, for errors: "messages[0].content[1].image_url"


@dataclass
class ParsedRequest:
    """What a validated request asks for; `messages` has {"type": "image"} placeholders that
    `images` fill in order (chat), or `prompt` is the raw completion prompt text."""

    model: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool
    messages: list[dict] | None = None
    images: list[ImageRef] = field(default_factory=list)
    prompt: str | list[int] | None = None
    # SamplingParams field -> the request field that set it, for errors found after parsing (compile_constraint).
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt text that can fit: max_model_len tokens of at most `chars_per_token`
    characters each (the tokenizer's longest token)."""

    max_model_len: int
    chars_per_token: int

    @property
    def max_chars(self) -> int:
        return self.max_model_len * self.chars_per_token


def _unicode(text: str, where: str) -> str:
    """`text` if it is valid Unicode; a lone surrogate (from a JSON escape such as "\\ud800") is refused."""
    if not text.isascii():  # O(1): CPython knows
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(f"'{where}' is not valid Unicode text: it has a lone surrogate "
                           f"{text[exc.start]!r} at index {exc.start}", where) from None
    return text


def _strings(value: Any) -> list[str]:
    """The strings of a field that holds one string or a list of them (stop, choice)."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


class PromptText:
    """The prompt's text, counted as the request is parsed, against its PromptLimit."""

    def __init__(self, limit: PromptLimit):
        self.limit, self.chars = limit, 0

    def take(self, text: str, where: str) -> str:
        self.chars += len(text)
        if self.chars > self.limit.max_chars:
            limit = self.limit
            raise APIError(f"'{where}' takes the prompt's text past {limit.max_chars} characters: more than "
                           f"max_model_len ({limit.max_model_len}) tokens of at most {limit.chars_per_token} "
                           "characters each", where)
        return _unicode(text, where)


def _path(*parts: str | int) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _same(value: Any, allowed: Any) -> bool:
    """JSON equality without Python's True == 1."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed and isinstance(value, numbers.Real) == isinstance(allowed, numbers.Real)


def _check_inert(body: dict) -> None:
    for name, allowed in INERT_VALUES.items():
        value = body.get(name)
        if value is not None and not any(_same(value, a) for a in allowed):
            raise APIError(f"'{name}' = {value!r} is not supported by this server "
                           f"(accepted: {', '.join(repr(a) for a in allowed)} or null)", name)


def _constraints(body: dict) -> list[tuple[str, str, Any]]:
    """The structured-output constraints a body asks for, as (request field, SamplingParams field,
    value); JSON schemas (or templates) already turned into JSON Schemas."""
    found = []
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise APIError(f"'response_format' must be an object, got {type_name(response_format)}", "response_format")
        kind = response_format.get("type")
        if kind == "json_object":
            found.append(("response_format", "json_object", True))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise APIError("'response_format.json_schema' must be an object with a 'schema'",
                               "response_format.json_schema")
            if spec.get("schema") is None:
                raise APIError("'response_format.json_schema.schema' is required (a JSON Schema or a template)",
                               "response_format.json_schema.schema")
            found.append(("response_format.json_schema.schema", "json_schema", spec["schema"]))
        elif kind != "text":
            raise APIError(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           "response_format.type")
    found += [(name, target, body[name]) for name, target in GUIDED_FIELDS.items() if body.get(name) is not None]
    options = body.get("structured_outputs")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(f"'structured_outputs' must be an object, got {type_name(options)}", "structured_outputs")
        for key, value in options.items():
            name = f"structured_outputs.{key}"
            if key in STRUCTURED_OUTPUTS_KEYS and value not in (None, False):
                found.append((name, STRUCTURED_OUTPUTS_KEYS[key], value))
            elif name not in WHITESPACE_FIELDS and value not in (None, False):
                raise APIError(f"'{name}' is not supported by this server", name)
    if len(found) > 1:
        raise APIError(f"at most one structured-output constraint per request, got {' and '.join(f[0] for f in found)}",
                       found[1][0])
    for i, (name, target, value) in enumerate(found):
        for text in _strings(value):
            _unicode(text, name)
        if target == "json_schema":
            try:
                found[i] = (name, target, as_json_schema(value, what=f"'{name}'"))
            except (TypeError, ValueError) as exc:
                raise APIError(str(exc), name) from exc
    return found


def _whitespace_pattern(body: dict) -> tuple[str, Any] | None:
    """(request field, value) of the whitespace pattern a body asks for, if any."""
    options = body.get("structured_outputs")
    values = {"guided_whitespace_pattern": body.get("guided_whitespace_pattern"),
              "structured_outputs.whitespace_pattern": options.get("whitespace_pattern")
              if isinstance(options, dict) else None}
    given = [(name, value) for name, value in values.items() if value is not None]
    if len(given) > 1:
        raise APIError(f"'{given[1][0]}': at most one whitespace pattern per request, got "
                       f"{' and '.join(WHITESPACE_FIELDS)}", given[1][0])
    for name, value in given:
        for text in _strings(value):
            _unicode(text, name)
    return given[0] if given else None


def _logprobs_count(body: dict, name: str, max_logprobs: int) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_logprobs):
        raise APIError(f"'{name}' must be an integer in [0, {max_logprobs}] (the server's max_logprobs), "
                       f"got {value!r}", name)
    return value


def chat_logprobs(body: dict, max_logprobs: int) -> int | None:
    """Chat's `logprobs` (a boolean) and `top_logprobs` -> SamplingParams.logprobs (None: off)."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError(f"'logprobs' must be a boolean, got {type_name(wanted)}", "logprobs")
    top = _logprobs_count(body, "top_logprobs", max_logprobs)
    if top and not wanted:
        raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def completion_logprobs(body: dict, max_logprobs: int) -> int | None:
    """The legacy completions' `logprobs` (the alternatives per token; false or null: off) ->
    SamplingParams.logprobs."""
    if body.get("logprobs") is False:
        return None
    return _logprobs_count(body, "logprobs", max_logprobs)


def sampling_params(body: dict, defaults: dict[str, Any], logprobs: int | None = None,
                    stream: bool = False) -> tuple[SamplingParams, dict[str, str]]:
    """SamplingParams from the request fields over the server's defaults (and `logprobs`, parsed
    from the endpoint's own fields), and which request field set each SamplingParams field; errors
    name the field. A request that is not streamed gets only its final output from the engine."""
    values = dict(defaults, logprobs=logprobs, output_kind="stream" if stream else "final_only")
    given: dict[str, str] = {}  # SamplingParams field -> request field, for error messages
    for name, target in SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None or target in given:  # max_completion_tokens wins over max_tokens
            continue
        given[target] = name
        values[target] = value
    for stop in _strings(body.get("stop")):
        _unicode(stop, "stop")
    reference = body.get("reference_text")
    if isinstance(reference, str):
        _unicode(reference, "reference_text")
        if len(reference) > MAX_REFERENCE_CHARS:
            raise APIError(f"'reference_text' has {len(reference)} characters, more than {MAX_REFERENCE_CHARS}",
                           "reference_text")
    structured = _constraints(body)
    whitespace = _whitespace_pattern(body)
    if whitespace is not None:
        structured.append((whitespace[0], "whitespace_pattern", whitespace[1]))
    for target, name in given.items():  # each alone, so that an error is that field's
        try:
            SamplingParams(**{target: values[target]})
        except (TypeError, ValueError) as exc:
            raise _renamed(exc, {target: name}, name) from exc
    for name, target, value in structured:
        given[target] = name
        values[target] = value
    try:
        return SamplingParams(**values), given
    except (TypeError, ValueError) as exc:  # every other field holds alone: the constraint's fields do not
        raise _renamed(exc, given, None) from exc


def compile_constraint(parsed: ParsedRequest, compile: Callable[[SamplingParams], Any]) -> None:
    """Compile the request's constraint with the engine's `compile` (LLMEngine.compile_constraint,
    which keeps it for the engine's prepare); a constraint that does not compile is refused naming
    its request field, with llguidance's error."""
    try:
        compile(parsed.params)
    except ValueError as exc:
        raise _renamed(exc, parsed.fields, None) from exc


def _renamed(exc: Exception, fields: dict[str, str], default: str | None) -> APIError:
    """A SamplingParams error as an APIError naming the request field `fields` maps its field to
    ('SamplingParams.regex ...' -> "'guided_regex' ..."); `default` where it names none of them."""
    message = str(exc)
    target = param_of(message, None)
    if target not in fields:
        return APIError(message, default)
    name = fields[target]
    return APIError(f"'{name}': {message.replace('SamplingParams.' + target, name)}", name)


def param_of(message: str, default: str | None) -> str | None:
    """The request field a SamplingParams error names ("SamplingParams.top_p must ..." -> top_p), else `default`."""
    match = re.search(r"SamplingParams\.(\w+)", message)
    return match.group(1) if match else default


def constraint_field(body: Any) -> str | None:
    """The request field of the structured-output constraint a body asks for; None if it asks for
    none or its constraints are malformed (parsing then says how)."""
    try:
        found = _constraints(body) if isinstance(body, dict) else []
    except APIError:
        return None
    return found[0][0] if found else None


def _stream_options(body: dict) -> tuple[bool, bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(f"'stream' must be a boolean, got {type_name(stream)}", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise APIError(f"'stream_options' must be an object, got {type_name(options)}", "stream_options")
    if not stream:
        raise APIError("'stream_options' is only allowed with 'stream': true", "stream_options")
    flags = []
    for name in ("include_usage", "continuous_usage_stats"):
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise APIError(f"'stream_options.{name}' must be a boolean", f"stream_options.{name}")
        flags.append(bool(value))
    return stream, flags[0], flags[1]


def model_field(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(f"'model' must be a string, got {type_name(model)}", "model")
    return model if model is None else _unicode(model, "model")


def parse_chat(body: Any, defaults: dict[str, Any], max_images: int, limit: PromptLimit,
               max_logprobs: int) -> ParsedRequest:
    """Validate a /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type_name(body)}")
    model = model_field(body)
    _check_inert(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array of messages", "messages")
    rendered, images, text = [], [], PromptText(limit)
    for i, message in enumerate(messages):
        where = _path("messages", i)
        if not isinstance(message, dict):
            raise APIError(f"'{where}' must be an object, got {type_name(message)}", where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        rendered.append({"role": "system" if role == "developer" else role,
                         "content": _content(content, f"{where}.content", role, images, text)})
    if len(images) > max_images:
        raise APIError(f"the request has {len(images)} images; at most {max_images} are allowed per request",
                       "messages")
    stream, include_usage, continuous = _stream_options(body)
    params, fields = sampling_params(body, defaults, chat_logprobs(body, max_logprobs), stream)
    return ParsedRequest(model=model, params=params, stream=stream, include_usage=include_usage,
                         continuous_usage=continuous, messages=rendered, images=images, fields=fields)


def _content(content: Any, where: str, role: str, images: list[ImageRef], text: PromptText) -> str | list[dict]:
    """OpenAI content -> transformers' chat-template content: a string stays a string; parts become
    {"type": "text", "text"} and {"type": "image"} (images only in user turns)."""
    if isinstance(content, str):
        return text.take(content, where)
    if not isinstance(content, list):
        raise APIError(f"'{where}' must be a string or an array of content parts, got {type_name(content)}", where)
    parts = []
    for j, part in enumerate(content):
        at = _path(where, j)
        if not isinstance(part, dict):
            raise APIError(f"'{at}' must be an object, got {type_name(part)}", at)
        kind = part.get("type")
        if kind == "text":
            value = part.get("text")
            if not isinstance(value, str):
                raise APIError(f"'{at}.text' must be a string, got {type_name(value)}", f"{at}.text")
            parts.append({"type": "text", "text": text.take(value, f"{at}.text")})
        elif kind == "image_url":
            if role != "user":
                raise APIError(f"'{at}': images are only allowed in user messages", at)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref  # {"url": ...} or, as the SDK documents, a bare string
            if not isinstance(url, str) or not url:
                raise APIError(f"'{at}.image_url' must be an object with a non-empty 'url' string", f"{at}.image_url")
            images.append(ImageRef(_unicode(url, f"{at}.image_url"), f"{at}.image_url"))
            parts.append({"type": "image"})
        else:
            raise APIError(f"'{at}.type' must be 'text' or 'image_url', got {kind!r}", f"{at}.type")
    return parts


def parse_completion(body: Any, defaults: dict[str, Any], limit: PromptLimit, max_logprobs: int) -> ParsedRequest:
    """Validate a /v1/completions body: one prompt, a string or a list of token ids."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type_name(body)}")
    model = model_field(body)
    _check_inert(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise APIError("'prompt' must be a string, a non-empty array of token ids, or an array of one of those "
                           "(one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise APIError("'prompt' must be a non-empty string or an array of token ids", "prompt")
    else:
        PromptText(limit).take(prompt, "prompt")
    stream, include_usage, continuous = _stream_options(body)
    params, fields = sampling_params(body, defaults, completion_logprobs(body, max_logprobs), stream)
    return ParsedRequest(model=model, params=params, stream=stream, include_usage=include_usage,
                         continuous_usage=continuous, prompt=prompt, fields=fields)


# ------------------------------------------------------------------------------------ responses

def usage(out: RequestOutput) -> dict:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class ResponseShape:
    """The id, model name and creation time shared by all chunks of one response."""

    kind: str  # "chat" | "completion"
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _choice(self, out: RequestOutput, text: str, delta: bool, first: bool, logprobs: dict | None) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            if delta:
                choice["delta"] = ({"role": "assistant", "content": text} if first else
                                   {"content": text} if text else {})
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        # A stream's first chunk only opens it (role, no text): the chunk after it carries the end,
        # even when the request finished on its first token.
        finished = out.finished and not (delta and first)
        choice["finish_reason"] = out.finish_reason if finished else None
        if finished:
            choice["stop_reason"] = out.stop_reason
        return choice

    @property
    def _object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def full(self, out: RequestOutput, logprobs: dict | None = None) -> dict:
        """The whole response; `logprobs` its choice's (server/logprobs.py), if asked for."""
        return {"id": self.id, "object": self._object, "created": self.created, "model": self.model,
                "choices": [self._choice(out, out.text, delta=False, first=False, logprobs=logprobs)],
                "usage": usage(out)}

    def chunk(self, out: RequestOutput, text: str, first: bool = False, with_usage: bool | None = None,
              logprobs: dict | None = None) -> dict:
        """A streaming chunk, `logprobs` those of its tokens; `with_usage` None leaves usage out, False
        sets it to null (include_usage asks for usage: null in every chunk but the last), True fills
        it (continuous_usage_stats)."""
        body = {"id": self.id, "object": self._chunk_object,
                "created": self.created, "model": self.model,
                "choices": [self._choice(out, text, delta=True, first=first, logprobs=logprobs)]}
        if with_usage is not None:
            body["usage"] = usage(out) if with_usage else None
        return body

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {"id": self.id, "object": self._chunk_object,
                "created": self.created, "model": self.model, "choices": [], "usage": usage(out)}
