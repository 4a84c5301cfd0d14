"""Structured outputs (json_schema, json_object, regex, choice, grammar) on the tiny random checkpoint.

Unconstrained, its random weights emit garbage; constrained, every output must parse and validate.
Strings are bounded with maxLength, arrays with maxItems, numbers with ranges and their decimals
with multipleOf, so that random weights reach the end of the grammar. The mask is also checked
against transformers: its greedy generate with the same llguidance mask as a logits processor gives
the same tokens, and a constraint that allows every token the model picks changes nothing.
"""
import json
import re

import jsonschema
import pytest
import torch

import glmrt
from glmrt import SamplingParams
from glmrt_testing.engine_checks import OracleDrafts
from glmrt_testing.helpers import hf_inputs, make_image

MAX_TOKENS = 400


def _obj(properties: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


def _str(n: int = 8) -> dict:
    return {"type": "string", "maxLength": n}


# multipleOf bounds a number's decimals; binary fractions, since jsonschema checks it in floating point
# (19.83 is "not a multiple of 0.01").
SCHEMAS = {
    "flat": _obj({"name": _str(), "date": _str(10)}),
    "nested": _obj({"person": _obj({"first": _str(), "last": _str()}), "address": _obj({"city": _str(6)})}),
    "array of objects": _obj({"items": {"type": "array", "maxItems": 3, "items": _obj({
        "name": _str(5), "price": {"type": "number", "minimum": 0, "maximum": 999, "multipleOf": 0.25}})}}),
    "array of strings": _obj({"tags": {"type": "array", "items": _str(4), "minItems": 1, "maxItems": 2}}),
    "enum": _obj({"status": {"enum": ["paid", "due", "void"]}, "currency": {"enum": ["CNY", "USD"]}}),
    "numbers": _obj({"count": {"type": "integer", "minimum": 0, "maximum": 99},
                     "ratio": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.125},
                     "ok": {"type": "boolean"}}),
    "unicode keys": _obj({"姓名": _str(6), "身份证号": {"type": "string", "pattern": "^[0-9]{6}$"},
                          "地址": _obj({"城市": {"enum": ["北京", "上海"]}})}),
    "optional keys": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9}, "note": _str(4)}, required=["id"]),
    "nullable": _obj({"value": {"anyOf": [_str(5), {"type": "null"}]}}),
    "defs and refs": {"$defs": {"line": _obj({"qty": {"type": "integer", "minimum": 1, "maximum": 9}})},
                      **_obj({"lines": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/line"}}})},
    "top-level array": {"type": "array", "maxItems": 3, "items": {"enum": [1, 2, 3]}},
    "model-card template": None,  # below
}


def _bounded_template_schema() -> dict:
    """The schema glmrt makes of a model-card template, with its unbounded strings and array bounded."""
    schema = glmrt.extraction.template_to_schema({"id_number": "", "name": "", "items": [{"price": ""}]})
    props = schema["properties"]
    for leaf in (props["id_number"], props["name"], props["items"]["items"]["properties"]["price"]):
        leaf["maxLength"] = 6
    props["items"]["maxItems"] = 2
    return schema


SCHEMAS["model-card template"] = _bounded_template_schema()

PROMPTS = [  # (image sizes, prompt): with and without images
    ([(56, 84)], "请按下列JSON格式输出图中信息:"),
    ([], "Extract the fields as JSON."),
    ([(112, 56), (56, 56)], "Information extraction:"),
]


def _request(i: int) -> dict:
    sizes, prompt = PROMPTS[i % len(PROMPTS)]
    return {"prompt": prompt, "images": [make_image(w, h, i) for w, h in sizes]}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch", max_num_seqs=16)


def _constrained_cases():
    """(SamplingParams, check(text)) for every schema, greedy and sampled, plus regex and choice."""
    cases = []
    for i, schema in enumerate(SCHEMAS.values()):
        sampled = dict(temperature=0.9, top_p=0.95, seed=i) if i % 2 else {}
        cases.append((SamplingParams(max_tokens=MAX_TOKENS, json_schema=schema, repetition_penalty=1.1, **sampled),
                      lambda text, schema=schema: jsonschema.validate(json.loads(text), schema)))
    pattern = r"[A-Z]{2}-[0-9]{3}(\.[a-z]{1,3})?"
    cases.append((SamplingParams(max_tokens=MAX_TOKENS, regex=pattern, temperature=1.0, seed=7),
                  lambda text: re.fullmatch(pattern, text) is not None))
    choices = ["invoice", "receipt", "身份证", "other \"kind\""]
    cases.append((SamplingParams(max_tokens=MAX_TOKENS, choice=choices), lambda text: text in choices))
    return cases


def test_every_constrained_output_parses_and_validates(llm):
    cases = _constrained_cases()
    outputs = llm.generate([_request(i) for i in range(len(cases))], [params for params, _ in cases])
    for (params, check), out in zip(cases, outputs):
        assert out.finish_reason == "stop", (out.finish_reason, out.error, out.text)
        assert out.token_ids[-1] in llm.engine.inputs.eos_token_ids  # ended by eos, as unconstrained output does
        assert check(out.text) is not False, out.text


def test_json_object_output_follows_the_grammar_at_every_token(llm):
    """Any JSON object: its keys are unbounded, so random weights may not finish one; every token
    must still be allowed, and a finished output must be an object."""
    params = SamplingParams(max_tokens=120, json_object=True)
    outputs = llm.generate([_request(i) for i in range(3)], params)
    for out in outputs:
        matcher = llm.engine.structured.matcher(params)
        assert all(matcher.consume_token(t) for t in out.token_ids), out.text
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_a_constraint_that_allows_every_chosen_token_changes_nothing(llm):
    """Greedy with a penalty, and seeded sampling without top_p (a top_p cut-off renormalised over
    the allowed tokens could differ), under a regex that admits any text. (Any text: a lone byte
    of a multi-byte character is no text, and seeds were picked whose draws contain none.)"""
    params = [SamplingParams(max_tokens=40, repetition_penalty=1.2),
              SamplingParams(max_tokens=40, temperature=0.8, top_k=100, seed=3),
              SamplingParams(max_tokens=40, temperature=1.0, seed=12)]
    requests = [_request(i) for i in range(len(params))]
    permissive = [_replace(p, regex=r"[\s\S]*") for p in params]
    free = llm.generate(requests, params)
    for out, p in zip(free, permissive):  # the precondition: the constraint allows every token chosen
        matcher = llm.engine.structured.matcher(p)
        assert all(matcher.consume_token(t) for t in out.token_ids), out.token_ids
    constrained = llm.generate(requests, permissive)
    for a, b in zip(free, constrained):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_constrained_and_unconstrained_requests_in_one_batch_do_not_affect_each_other(llm):
    cases = _constrained_cases()[:4]
    free_params = [SamplingParams(max_tokens=30, repetition_penalty=1.1),
                   SamplingParams(max_tokens=30, temperature=0.7, seed=5)]
    requests = [_request(i) for i in range(len(cases) + len(free_params))]
    alone_constrained = llm.generate(requests[:len(cases)], [p for p, _ in cases])
    alone_free = llm.generate(requests[len(cases):], free_params)
    mixed = llm.generate(requests, [p for p, _ in cases] + free_params)
    assert [o.token_ids for o in mixed] == [o.token_ids for o in alone_constrained + alone_free]


def test_a_constrained_row_decodes_beside_prefill_chunks(llm, monkeypatch):
    """A running json_schema request does not turn mixed steps off: a prompt arriving while it
    decodes is prefilled in the same steps as its constrained decode row (the engine fills its
    mask between the step's forward and its sampling), and both outputs are those they have alone."""
    engine = llm.engine
    (params, check), late_params = _constrained_cases()[0], SamplingParams(max_tokens=12, repetition_penalty=1.1)
    alone = llm.generate([_request(0), _request(1)], [params, late_params])
    mixed_steps = []
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        if getattr(plan, "chunks", None):
            mixed_steps.append(any(seq.grammar is not None for seq in plan.decode))
        return plan

    monkeypatch.setattr(engine.scheduler, "schedule", spy)
    first = engine.add_request(_request(0), params)
    outputs = {}
    for _ in range(3):  # its prefill, then decode steps
        outputs.update((o.request_id, o) for o in engine.step())
    late = engine.add_request(_request(1), late_params)
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step())
    assert any(mixed_steps), "the late prompt was never prefilled beside the constrained decode row"
    check(outputs[first].text)
    assert [outputs[first].token_ids, outputs[late].token_ids] == [o.token_ids for o in alone]


def test_serial_steps_and_preemption_give_the_same_constrained_outputs(llm, tiny_checkpoint):
    cases = _constrained_cases()[:6]
    requests = [_request(i) for i in range(len(cases))]
    reference = llm.generate(requests, [p for p, _ in cases])
    # Serial steps, and a KV cache so small that running requests are preempted and recomputed.
    tight = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch",
                      async_scheduling=False, max_model_len=320, kv_cache_tokens=320, block_size=16)
    outputs = tight.generate(requests, [p for p, _ in cases])
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_the_masks_of_verified_positions_are_each_rows_grammar_after_its_drafts(llm):
    """fill_masks with drafts: row i's position j is its grammar's mask after its first j drafts
    (the matcher itself not advanced); a row with no drafts or no constraint, and the positions
    after a draft its grammar refuses, are as documented."""
    structured = llm.engine.structured
    params = SamplingParams(json_schema=SCHEMAS["flat"])
    text = json.dumps({"name": "ab", "date": "x"}, separators=(", ", ": "))
    ids = llm.engine.processor.tokenizer.encode(text, add_special_tokens=False).ids
    fresh = structured.matcher(params)
    assert fresh.validate_tokens(ids) == len(ids) > 3
    refused = next(t for t in range(7, 59392, 101) if fresh.validate_tokens(ids[:1] + [t]) == 1)
    matchers = [structured.matcher(params), None, structured.matcher(params), structured.matcher(params)]
    drafts = [ids[:3], [5, 6, 7], [], [ids[0], refused, ids[1]]]
    masks = structured.fill_masks(matchers, pin=False, drafts=drafts, positions=4)
    assert masks.shape == (4, 4, structured.mask_words)

    def mask_after(tokens):
        m = structured.matcher(params)
        assert m.consume_tokens(tokens)
        return structured.fill_masks([m], pin=False)[0]

    start = mask_after([])
    assert not torch.equal(start, torch.full_like(start, -1))
    for j in range(4):
        assert torch.equal(masks[0, j], mask_after(ids[:j])), j
    assert (masks[1] == -1).all()  # no constraint
    assert torch.equal(masks[2, 0], start) and (masks[2, 1:] == -1).all()  # no drafts: its next token only
    assert torch.equal(masks[3, 0], start) and torch.equal(masks[3, 1], mask_after(ids[:1]))
    assert (masks[3, 2:] == -1).all()  # after the refused draft: never reached
    assert torch.equal(structured.fill_masks([matchers[0]], pin=False)[0], start)  # not advanced


def _refusing_drafts(engine, continuation, corrupt: float):
    """OracleDrafts' `replace`: every draft of a constrained row after the first replaced, with
    probability `corrupt`, by a token its grammar refuses there (`continuation(seq)`: the
    request's known output)."""
    gen = torch.Generator().manual_seed(0)

    def replace(seq, n, known):
        full = seq.prompt_token_ids + continuation(seq)
        for j in range(1, len(known)):
            corrupt_it = torch.rand(1, generator=gen) < corrupt
            if seq.grammar is not None and corrupt_it and n + 1 + j <= len(full):
                matcher = engine.structured.matcher(seq.sampling_params)
                assert matcher.consume_tokens(full[len(seq.prompt_token_ids): n + 1 + j])
                known[j] = next(t for t in range(7, 59392, 101) if not matcher.validate_tokens([t]))
        return known
    return replace


@pytest.mark.parametrize("drafts", ["mtp", "right", "refused"])
def test_constrained_rows_speculate_under_the_masks_of_their_verified_positions(llm, tiny_checkpoint, drafts):
    """Constrained rows speculate like any other (k = 3): the host fills the masks of the k + 1
    verified positions between the drafts and the verify, each row's grammar advanced through its
    drafts. Greedy outputs are those without speculation whatever the drafts: the MTP layer's,
    the right continuation (accepted, so every later position is sampled under its own mask), or
    right drafts with some replaced by tokens the grammar refuses there (rejected by the mask)."""
    cases = [case for case in _constrained_cases() if case[0].temperature == 0][:5]
    params = [p for p, _ in cases] + [SamplingParams(max_tokens=30, repetition_penalty=1.1)]
    # distinct prompts, which the oracle tells the requests by
    requests = [{**_request(i), "prompt": f"{_request(i)['prompt']} ({i})"} for i in range(len(params))]
    reference = llm.generate(requests, params)
    spec = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch", max_num_seqs=16,
                     num_speculative_tokens=3)
    if drafts != "mtp":
        continuations = {tuple(o.prompt_token_ids): o.token_ids for o in reference}

        def continuation(seq):
            return continuations[tuple(seq.prompt_token_ids)]

        refuse = _refusing_drafts(spec.engine, continuation, corrupt=0.5) if drafts == "refused" else None
        OracleDrafts(spec.engine, continuation, refuse)
    outputs = spec.generate(requests, params)
    assert [(o.token_ids, o.finish_reason) for o in outputs] == [(o.token_ids, o.finish_reason) for o in reference]
    for (_, check), out in zip(cases, outputs):
        assert check(out.text) is not False, out.text
    stats = spec.engine.spec_stats
    assert stats.num_drafts > 0
    if drafts == "right":  # short of every draft only where a request ends inside a step
        assert stats.num_accepted_tokens > 0.8 * stats.num_draft_tokens
    elif drafts == "refused":
        assert 0 < stats.num_accepted_tokens < 0.8 * stats.num_draft_tokens


def test_sampled_constrained_rows_speculate_to_valid_outputs(tiny_checkpoint):
    """Sampled constrained rows (rejection sampling under the masks of the verified positions)
    with the MTP layer's drafts: every output is complete and valid."""
    cases = [case for case in _constrained_cases() if case[0].temperature > 0]
    spec = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch", max_num_seqs=16,
                     num_speculative_tokens=2)
    outputs = spec.generate([_request(i) for i in range(len(cases))], [p for p, _ in cases])
    for (_, check), out in zip(cases, outputs):
        assert out.finish_reason == "stop", (out.finish_reason, out.error, out.text)
        assert check(out.text) is not False, out.text
    assert spec.engine.spec_stats.num_drafts > 0


def test_greedy_constrained_tokens_equal_transformers_generate_with_the_same_mask(llm, hf_model, hf_processor):
    from transformers import LogitsProcessor, LogitsProcessorList

    schema = SCHEMAS["nested"]
    params = SamplingParams(max_tokens=MAX_TOKENS, json_schema=schema, repetition_penalty=1.1)
    names_sizes, prompt = [(56, 84)], "请按下列JSON格式输出图中信息:"
    images = [make_image(w, h, 0) for w, h in names_sizes]
    ours = llm.generate({"prompt": prompt, "images": images}, params)[0]

    structured = llm.engine.structured
    matcher = structured.matcher(params)

    class Guidance(LogitsProcessor):  # llguidance's mask as a transformers logits processor
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            if self.start is None:
                self.start = input_ids.shape[1]
            elif input_ids.shape[1] > self.start:
                assert matcher.consume_token(int(input_ids[0, -1]))
            mask = structured.fill_masks([matcher], pin=False)
            cols = torch.arange(scores.shape[1])
            allowed = ((mask[0, cols // 32] >> (cols % 32)) & 1).bool()
            return scores.masked_fill(~allowed[None], float("-inf"))

    inputs = hf_inputs(hf_processor, images, prompt)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, repetition_penalty=1.1,
                                logits_processor=LogitsProcessorList([Guidance()]))
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.finish_reason == "stop" and ours.token_ids == theirs
    jsonschema.validate(json.loads(ours.text), schema)


def test_ignore_eos_still_ends_when_the_constraint_is_complete(llm):
    choices = ["yes", "no"]
    out = llm.generate(_request(1), SamplingParams(max_tokens=50, choice=choices, ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text in choices
    assert out.token_ids[-1] in llm.engine.inputs.eos_token_ids


# The bounded schemas whose numbers are integers: JSON output equals json.dumps of its value (floats
# keep the model's spelling, 0.50 or 1e2, so "numbers" and "array of objects" are left out).
INTEGER_SCHEMAS = [schema for schema in SCHEMAS.values() if '"number"' not in json.dumps(schema)]
# glmrt's default before JSON was compact: bounded runs of free whitespace.
OLD_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,48}"


def _sampled_json(llm, schemas: list[dict], max_tokens: int, **fields) -> list:
    """Each schema sampled at temperature 1 (seed i)."""
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, json_schema=schema, **fields)
              for i, schema in enumerate(schemas)]
    return llm.generate([_request(i) for i in range(len(params))], params)


def _finished_compact(out) -> bool:
    """Whether `out` ended by itself with JSON written as json.dumps writes it."""
    return out.finish_reason == "stop" and out.text == json.dumps(json.loads(out.text), ensure_ascii=False)


def test_json_is_compact_by_default_and_every_bounded_schema_finishes(llm):
    assert len(INTEGER_SCHEMAS) == 10
    for schema, out in zip(INTEGER_SCHEMAS, _sampled_json(llm, INTEGER_SCHEMAS, max_tokens=200)):
        assert _finished_compact(out), (out.finish_reason, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_a_whitespace_pattern_brings_back_free_whitespace(llm):
    """With the old default's whitespace runs, random weights write tabs, newlines and carriage
    returns between JSON tokens (raw, so outside strings): no such output is in json.dumps's layout."""
    outputs = _sampled_json(llm, INTEGER_SCHEMAS[:4], max_tokens=30, whitespace_pattern=OLD_WHITESPACE)
    assert any(re.search(r"[\t\n\r]", out.text) for out in outputs), [out.text for out in outputs]


@pytest.mark.parametrize("grammar,language", [
    # llguidance's Lark dialect: a `start:` rule
    ('start: greeting " " NAME "!"\ngreeting: "hello" | "hi"\nNAME: /[a-z]{1,6}/', r"(hello|hi) [a-z]{1,6}!"),
    # llama.cpp's GBNF (vLLM's "EBNF"): converted to Lark
    ('root ::= answer "-" [0-9] [0-9]?\nanswer ::= "yes" | "no"', r"(yes|no)-[0-9]{1,2}"),
])
def test_a_grammar_constrains_the_output_to_its_language(llm, grammar, language):
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=seed, grammar=grammar) for seed in range(4)]
    outputs = llm.generate([_request(i) for i in range(4)], params)
    for out in outputs:
        assert out.finish_reason == "stop" and re.fullmatch(language, out.text), (out.finish_reason, out.text)
    assert len({out.text for out in outputs}) > 1  # sampled: more than one sentence of the language


def test_a_repeated_constraint_compiles_once(llm, monkeypatch):
    """The engine compiles a constraint at its first prepare and copies the compiled matcher after,
    keyed by the constraint's text; a schema with its properties in another order is another grammar."""
    import llguidance

    compiled = []
    real = llguidance.LLMatcher

    class CountingMatcher:  # llguidance.LLMatcher, counting the matchers built (each compiles its grammar)
        def __call__(self, tokenizer, grammar, **options):
            compiled.append(grammar)
            return real(tokenizer, grammar, **options)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(llguidance, "LLMatcher", CountingMatcher())
    a = _obj({"cache_test_a": _str(), "cache_test_b": _str()})
    a_reordered = _obj({"cache_test_b": _str(), "cache_test_a": _str()})
    b = _obj({"cache_test_c": _str()})
    first = llm.engine.prepare(_request(1), SamplingParams(json_schema=a))
    again = llm.engine.prepare(_request(1), SamplingParams(json_schema=json.dumps(a), temperature=0.5))
    assert len(compiled) == 1 and first.grammar is not again.grammar  # one compile, one matcher per request
    llm.engine.prepare(_request(1), SamplingParams(json_schema=b))
    llm.engine.prepare(_request(1), SamplingParams(json_schema=a_reordered))
    llm.engine.prepare(_request(1), SamplingParams(json_schema=a, whitespace_pattern=" ?"))
    assert len(compiled) == 4
    llm.engine.prepare(_request(1), SamplingParams(json_schema=b))
    assert len(compiled) == 4


@pytest.mark.parametrize("fields,match", [
    ({"json_schema": "{not json"}, r"SamplingParams\.json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, r"SamplingParams\.json_schema must be a JSON Schema object"),
    ({"json_schema": {"enum": [{1, 2}]}}, r"SamplingParams\.json_schema holds set \{1, 2\}, which is not JSON"),
    ({"regex": ""}, r"SamplingParams\.regex must be a non-empty str"),
    ({"grammar": b"start: x"}, r"SamplingParams\.grammar must be a non-empty str"),
    ({"choice": []}, r"SamplingParams\.choice must be a non-empty list"),
    ({"choice": ["a", 1]}, r"SamplingParams\.choice must be a non-empty list"),
    ({"json_object": "yes"}, r"SamplingParams\.json_object must be a bool"),
    ({"regex": "a", "choice": ["a"]},
     r"at most one of json_schema, json_object, regex, choice, grammar, got regex and choice"),
    ({"whitespace_pattern": " *"}, r"SamplingParams\.whitespace_pattern applies to JSON output.*got no constraint"),
    ({"regex": "a", "whitespace_pattern": " *"},
     r"SamplingParams\.whitespace_pattern applies to JSON output.*got regex"),
    ({"json_object": True, "whitespace_pattern": [" "]}, r"SamplingParams\.whitespace_pattern must be a non-empty str"),
    # sizes, refused before anything is compiled
    ({"choice": [f"option {i}" for i in range(10_001)]}, r"SamplingParams\.choice has 10001 options; at most 10000"),
    ({"choice": ["x" * 100_000] * 3}, r"SamplingParams\.choice has 300000 characters in its options; at most 262144"),
    ({"regex": "a" * 262_145}, r"SamplingParams\.regex is 262145 characters long; at most 262144"),
    ({"grammar": "start: " + "a" * 262_145}, r"SamplingParams\.grammar is 262152 characters long; at most 262144"),
    ({"json_schema": {"enum": ["v" * 1000] * 300}}, r"SamplingParams\.json_schema is more than 262144 characters"),
])
def test_a_malformed_constraint_is_refused_naming_its_field(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SamplingParams(**fields)


@pytest.mark.parametrize("fields,match", [
    ({"json_schema": {"type": "bogus"}}, r"SamplingParams\.json_schema cannot be used.*bogus"),
    ({"json_schema": {"$ref": "#/$defs/missing"}}, r"SamplingParams\.json_schema cannot be used"),
    ({"regex": "a(b"}, r"(?s)SamplingParams\.regex cannot be used.*unclosed group"),
    ({"grammar": "start: greeting\n"},
     r'SamplingParams\.grammar cannot be used as a constraint: .*unknown name: "greeting"$'),
    ({"grammar": "root ::= greeting"},
     r"SamplingParams\.grammar has no `start:` rule, so it was read as GBNF: .*'greeting'"),
    ({"json_object": True, "whitespace_pattern": "[ \t"},
     r"(?s)SamplingParams\.whitespace_pattern is not a regex.*unclosed"),
])
def test_a_constraint_that_does_not_compile_is_refused_by_prepare_naming_its_field(llm, fields, match):
    """SamplingParams checks types and sizes only; the engine compiles (llguidance's error, without
    the excerpt of the grammar it appends)."""
    params = SamplingParams(**fields)
    with pytest.raises(ValueError, match=match):
        llm.engine.prepare(_request(1), params)


def test_a_choice_of_more_options_than_an_earley_row_holds(llm):
    """llguidance's parser takes at most 2,000 items in a grammar row: a choice is one lexeme
    instead, so 2,500 options (a 500 before, failing at the first token) decode like two."""
    choices = [f"option {i}" for i in range(2500)]
    out = llm.generate(_request(1), SamplingParams(max_tokens=16, choice=choices))[0]
    assert out.finish_reason == "stop" and out.text in choices


def test_triton_backend_gives_the_torch_backends_constrained_tokens(llm, tiny_checkpoint):
    """The Triton bitmask kernel in the engine (interpreted on CPU): same tokens as the torch ops."""
    params = [SamplingParams(max_tokens=12, choice=["yes", "no", "maybe"], repetition_penalty=1.1),
              SamplingParams(max_tokens=12, regex=r"[A-Z]{2}-[0-9]{3}", temperature=1.0, seed=4)]
    requests = [_request(1), _request(1)]
    triton = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="triton")
    ours = triton.generate(requests, params)
    assert all(o.finish_reason == "stop" for o in ours)
    assert [o.token_ids for o in ours] == [o.token_ids for o in llm.generate(requests, params)]
