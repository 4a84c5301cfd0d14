"""Log-probabilities (SamplingParams.logprobs): the raw distribution's, for every generated token,
from every kind of step.

The reference is transformers' `generate(output_logits=True)`, whose logits are the raw ones
(before its logits processors): log_softmax of them in fp32 is what glmrt reports, bit for bit on
the torch backend in fp32 (its logits are transformers' own bits, see test_parity_dtypes). The
values must not move with the repetition penalty or temperature, nor with the structured-output
mask; speculative steps, mixed steps and steps with constrained rows report what plain steps do;
`ModelRunner.logprobs_of` is the one place they are computed, and never for a step that did not
ask.
"""
import pytest
import torch

import glmrt
from glmrt.engine.engine import EngineConfig, LLMEngine
from glmrt.engine.sampler import Sampler, SamplingState
from glmrt.model.ops import make_ops
from glmrt_testing.engine_checks import OracleDrafts, assert_all_free
from glmrt_testing.helpers import IMAGES

IMAGE_TOKEN_ID = 59280
PROMPT = "Text Recognition:"
TOKENS = 6
SCHEMA = {"type": "object", "required": ["a"], "additionalProperties": False,
          "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}}


def make_engine(path, backend="torch", **options):
    return LLMEngine(str(path), device="cpu", dtype="float32", backend=backend, **options)


def request(image: str | None = "small", prompt: str = PROMPT) -> dict:
    return {"images": [IMAGES[image]] if image else [], "prompt": prompt}


@pytest.fixture(scope="module")
def hf_sdpa(tiny_checkpoint):
    """transformers' model in fp32 with its default (sdpa) attention, bit-identical to the torch backend."""
    from transformers import GlmOcrForConditionalGeneration

    return GlmOcrForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return make_engine(tiny_checkpoint)


def hf_raw_logprobs(hf, engine, req: dict, max_new_tokens: int, **generate) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens for `req` (glmrt's processed inputs) and log_softmax of its raw
    logits [new tokens, V], in fp32."""
    p = engine.processor(images=req["images"], prompt=req["prompt"])
    ids = torch.tensor([p.input_ids])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int())
    if p.pixel_values is not None:
        inputs.update(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **generate)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def check_entries(out: glmrt.RequestOutput, n: int) -> None:
    """One entry per token, each the top n (most likely first) and the token itself."""
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) in (n, n + 1)
        top = list(entry.values())[:n]
        assert top == sorted(top, reverse=True)
        if len(entry) == n + 1:  # the token is not among the top n: it comes last, less likely
            assert list(entry)[-1] == token and entry[token] <= top[-1]


def assert_same_logprobs(ours: list[dict], theirs: list[dict], exact: bool = True) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert list(a) == list(b), f"token {i}: ids {list(a)} != {list(b)}"
        if exact:
            assert list(a.values()) == list(b.values()), f"token {i}"
        else:
            assert torch.allclose(torch.tensor(list(a.values())), torch.tensor(list(b.values())), atol=1e-5, rtol=0), i


# ------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_raw_logprobs_are_transformers_log_softmax_bit_for_bit(engine, hf_sdpa, penalty):
    """Greedy (with and without a repetition penalty, which must not change the values): each
    entry is log_softmax of transformers' raw logits at that step, torch.equal, its top 5 the
    top 5 of that row in order."""
    n = 5
    params = glmrt.SamplingParams(max_tokens=TOKENS, repetition_penalty=penalty, logprobs=n)
    out = engine.generate([request()], [params])[0]
    tokens, reference = hf_raw_logprobs(hf_sdpa, engine, request(), TOKENS, repetition_penalty=penalty)
    assert out.token_ids == tokens and len(tokens) == TOKENS
    check_entries(out, n)
    for i, (token, entry) in enumerate(zip(tokens, out.logprobs)):
        top = reference[i].topk(n)
        assert list(entry)[:n] == top.indices.tolist(), f"token {i}"
        expected = {t: reference[i, t] for t in entry}
        assert all(torch.equal(torch.tensor(entry[t]), expected[t]) for t in entry), (i, entry, expected)


def test_zero_gives_the_sampled_token_alone_and_none_gives_nothing(engine):
    outs = engine.generate([request(), request(), request()],
                           [glmrt.SamplingParams(max_tokens=4, logprobs=0), glmrt.SamplingParams(max_tokens=4),
                            glmrt.SamplingParams(max_tokens=4, logprobs=2)])
    zero, none, two = outs
    assert [list(e) for e in zero.logprobs] == [[t] for t in zero.token_ids]
    assert none.logprobs is None
    assert [e[t] for t, e in zip(two.token_ids, two.logprobs)] == [e[t] for t, e in zip(zero.token_ids, zero.logprobs)]


def test_a_stop_token_is_reported_where_the_text_holds_it(engine):
    """A stop token that ends a request is left out of the text and of delta_token_ids (the
    server's logprobs entries follow them), unless include_stop_str_in_output keeps it in both."""
    free = engine.generate([request()], [glmrt.SamplingParams(max_tokens=TOKENS, ignore_eos=True)])[0]
    stop = free.token_ids[2]
    for keep in (False, True):
        outs = []
        params = glmrt.SamplingParams(max_tokens=TOKENS, stop_token_ids=[stop], ignore_eos=True, logprobs=1,
                                      include_stop_str_in_output=keep)
        engine.add_request(request(), params)
        while engine.has_unfinished():
            outs += engine.step()
        delta = [t for out in outs for t in out.delta_token_ids]
        assert outs[-1].token_ids[-1] == stop and len(outs[-1].logprobs) == len(outs[-1].token_ids)
        assert delta == (outs[-1].token_ids if keep else outs[-1].token_ids[:-1])


def test_temperature_and_top_k_leave_the_raw_values(engine):
    """top_k 1 samples the argmax whatever the temperature, so the tokens are greedy's: so must the
    values be (not those of logits / temperature, nor of the top-k-filtered distribution)."""
    greedy = engine.generate([request()], [glmrt.SamplingParams(max_tokens=TOKENS, logprobs=3)])[0]
    hot = engine.generate([request()], [glmrt.SamplingParams(max_tokens=TOKENS, logprobs=3, temperature=0.5, top_k=1,
                                                             seed=7)])[0]
    assert hot.token_ids == greedy.token_ids
    assert_same_logprobs(hot.logprobs, greedy.logprobs)


def test_structured_output_reports_the_unmasked_distribution(engine, hf_sdpa):
    """A json_schema request: its tokens follow the grammar, its logprobs are the raw model's
    (transformers' teacher-forced log_softmax over the prompt and those tokens), so its top tokens
    are mostly ones the grammar forbids."""
    n = 4
    out = engine.generate([request()], [glmrt.SamplingParams(max_tokens=12, json_schema=SCHEMA, logprobs=n)])[0]
    check_entries(out, n)
    p = engine.processor(images=[IMAGES["small"]], prompt=PROMPT)
    ids = torch.tensor([p.input_ids + out.token_ids])
    with torch.no_grad():
        logits = hf_sdpa(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values,
                         image_grid_thw=p.image_grid_thw, mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int()).logits[0]
    reference = torch.log_softmax(logits[len(p.input_ids) - 1: -1].float(), dim=-1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert torch.allclose(torch.tensor(entry[token]), reference[i, token], atol=1e-5, rtol=0), i
        assert list(entry)[:n] == reference[i].topk(n).indices.tolist(), i
    text = engine.processor.decode(out.token_ids, skip_special_tokens=True)
    assert text.startswith('{"a"')  # constrained indeed ...
    assert any(list(e)[0] != t for t, e in zip(out.token_ids, out.logprobs))  # ... against the raw argmax


# ------------------------------------------------------------------------------ every step kind

class StepKinds:
    """Wraps a runner's step entry point and logprobs_of: which kinds of steps computed
    log-probabilities, with the raw logits rows they got."""

    def __init__(self, runner, monkeypatch):
        self.kind, self.seen = None, []
        launch = runner.launch

        def tagged(step, masks, speculate=False, drafts=None):
            if step.chunks:
                self.kind = "mixed" if step.decode else "prefill"
            else:
                self.kind = "speculative" if speculate else "decode"

            def tagged_masks(read_drafts):  # a decode step whose rows include a constrained one
                made = masks(read_drafts)
                if made is not None and not step.chunks:
                    self.kind = "constrained " + self.kind
                return made

            return launch(step, tagged_masks, speculate, drafts)

        monkeypatch.setattr(runner, "launch", tagged)
        logprobs_of = runner.logprobs_of

        def recording(logits, tokens, num_logprobs):
            assert logits.dim() == 2 and logits.shape[0] == tokens.shape[0]
            self.seen.append((self.kind, logits.shape[0], num_logprobs))
            return logprobs_of(logits, tokens, num_logprobs)

        monkeypatch.setattr(runner, "logprobs_of", recording)

    @property
    def kinds(self) -> set[str]:
        return {kind for kind, _, _ in self.seen}


def assert_same_outputs(outs: list[glmrt.RequestOutput], refs: list[glmrt.RequestOutput]) -> None:
    """The same tokens, and log-probabilities within 1e-5 where the reference has them."""
    for out, ref in zip(outs, refs, strict=True):
        assert out.token_ids == ref.token_ids
        if ref.logprobs is None:
            assert out.logprobs is None
        else:
            assert_same_logprobs(out.logprobs, ref.logprobs, exact=False)


def run_staggered(engine, arrivals: dict[int, list[tuple[dict, glmrt.SamplingParams]]]) -> list[glmrt.RequestOutput]:
    """Requests added at the given step indices -> their final outputs, in arrival order."""
    order, done, step = [], {}, 0
    while len(done) < sum(map(len, arrivals.values())):
        for req, params in arrivals.get(step, []):
            order.append(engine.add_request(req, params))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 1000
    return [done[i] for i in order]


def test_mixed_and_constrained_steps_report_what_a_request_alone_does(tiny_checkpoint, monkeypatch):
    """Three requests (logprobs 2, a json_schema with logprobs 3, none) arriving at different steps:
    prefills, mixed steps (decode rows + a chunk), plain decode steps and decode steps with a
    constrained row all report, each row what it reports alone (within 1e-5: the torch backend is not
    batch-invariant)."""
    cases = [(request(), glmrt.SamplingParams(max_tokens=10, logprobs=2)),
             (request("wide", "Table Recognition:"), glmrt.SamplingParams(max_tokens=10, json_schema=SCHEMA,
                                                                          logprobs=3)),
             (request(None, "a text-only prompt"), glmrt.SamplingParams(max_tokens=10))]
    alone = [make_engine(tiny_checkpoint).generate([r], [p])[0] for r, p in cases]
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=64)  # prompts in several chunks
    steps = StepKinds(engine.runner, monkeypatch)
    outs = run_staggered(engine, {0: [cases[0]], 2: [cases[1]], 4: [cases[2]]})
    assert steps.kinds == {"prefill", "mixed", "decode", "constrained decode"}, steps.seen
    assert max(num for _, _, num in steps.seen) == 3
    assert_same_outputs(outs, alone)
    assert_all_free(engine)


def test_steps_that_ask_for_none_never_compute_them(engine, monkeypatch):
    def refuse(*args):
        raise AssertionError("logprobs_of ran for a step that asked for none")

    monkeypatch.setattr(engine.runner, "logprobs_of", refuse)
    out = engine.generate([request(), request(None, "x")],
                          [glmrt.SamplingParams(max_tokens=4), glmrt.SamplingParams(max_tokens=4, json_schema=SCHEMA)])
    assert all(o.logprobs is None and o.token_ids for o in out)


def test_speculative_steps_report_what_plain_steps_do(tiny_checkpoint, monkeypatch):
    """num_speculative_tokens 3 with the MTP layer's drafts (random weights: mostly rejected) and
    with drafts that are accepted: the same tokens and logprobs as plain decoding, one entry per
    token taken, none for the tokens of a step after a stop token; rows with different N (and none)
    share the steps. Within 1e-5, not bit for bit: the torch backend is not batch-invariant (a
    row's logits move in the last bits with the rows and queries beside it)."""
    reqs = [request(), request(None, "a text-only prompt"), request("wide", "Table Recognition:")]
    params = [glmrt.SamplingParams(max_tokens=14, logprobs=2), glmrt.SamplingParams(max_tokens=14),
              glmrt.SamplingParams(max_tokens=14, logprobs=0, repetition_penalty=1.2)]
    plain = make_engine(tiny_checkpoint).generate(reqs, params)
    stop = plain[0].token_ids[5]  # a stop token inside a run of accepted drafts
    stopped = [glmrt.SamplingParams(max_tokens=14, logprobs=2, stop_token_ids=[stop])] + params[1:]
    plain_stopped = make_engine(tiny_checkpoint).generate(reqs[:1], stopped[:1])[0]
    assert plain_stopped.token_ids == plain[0].token_ids[:plain[0].token_ids.index(stop) + 1]
    for oracle, ps, refs in ((False, params, plain), (True, stopped, [plain_stopped, *plain[1:]])):
        engine = make_engine(tiny_checkpoint, num_speculative_tokens=3)
        steps = StepKinds(engine.runner, monkeypatch)
        if oracle:
            continuations = {f"req-{i}": p.token_ids for i, p in enumerate(plain)}
            OracleDrafts(engine, lambda seq: continuations[seq.request_id])
        outs = engine.generate(reqs, ps)
        assert "speculative" in steps.kinds
        assert any(rows == 3 * 4 for kind, rows, _ in steps.seen if kind == "speculative")  # bs * (k + 1)
        if oracle:
            assert engine.spec_stats.num_accepted_tokens > 10
        assert_same_outputs(outs, refs)


def test_triton_backend_matches_the_torch_backend(tiny_checkpoint, engine):
    """A prefill and a decode step (the Triton interpreter is slow), within 1e-5."""
    params = glmrt.SamplingParams(max_tokens=2, logprobs=3)
    req = {"prompt_token_ids": [59248, 59250, 59253, 70, 71]}
    ours = make_engine(tiny_checkpoint, "triton").generate([req], [params])[0]
    reference = engine.generate([req], [params])[0]
    assert ours.token_ids == reference.token_ids
    assert_same_logprobs(ours.logprobs, reference.logprobs, exact=False)


# ------------------------------------------------------------------------------------ the edges

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_sampler_leaves_its_logits_unchanged(backend):
    """The masked, penalised sampling of fp32 logits works on a copy, so the raw logits the step
    computed are still there for logprobs_of."""
    rows, vocab = 3, 70
    state = SamplingState(rows, vocab, torch.device("cpu"))
    state.penalty[:] = 1.5
    state.presence[:, :10] = True
    state.temperature[1] = 0.7
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    raw = logits.clone()
    mask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
    mask[:, 0] = 0b1010
    sampler = Sampler(make_ops(backend), state)
    sampler(logits, slice(0, rows), do_sample=True, token_mask=mask)
    assert torch.equal(logits, raw)
    drafts = torch.zeros(1, 2, dtype=torch.int64)
    sampler.verify(logits, drafts, slice(0, 1), do_sample=True)
    assert torch.equal(logits, raw)


def test_too_many_logprobs_are_refused_naming_the_field(tiny_checkpoint, engine):
    with pytest.raises(ValueError, match=r"SamplingParams\.logprobs = 21 .* max_logprobs \(20\)"):
        engine.add_request(request(), glmrt.SamplingParams(logprobs=21))
    small = make_engine(tiny_checkpoint, max_logprobs=2)
    with pytest.raises(ValueError, match=r"SamplingParams\.logprobs = 3 .* max_logprobs \(2\)"):
        small.add_request(request(), glmrt.SamplingParams(logprobs=3))
    assert small.generate([request()], [glmrt.SamplingParams(max_tokens=2, logprobs=2)])[0].logprobs
    with pytest.raises(ValueError, match=r"SamplingParams\.logprobs must be None \(off\) or an int >= 0"):
        glmrt.SamplingParams(logprobs=-1)
    with pytest.raises(TypeError, match=r"SamplingParams\.logprobs must be an int"):
        glmrt.SamplingParams(logprobs=True)
    with pytest.raises(ValueError, match="max_logprobs must be an int >= 0"):
        EngineConfig(max_logprobs=-1)


def test_token_texts_are_each_tokens_own_bytes(tiny_checkpoint):
    """The server's token strings and bytes: byte-level tokens give the bytes they stand for (a
    byte inside a multi-byte character shows as U+FFFD), special tokens their content, so the bytes
    of a text's tokens join up to its UTF-8."""
    from tokenizers import Tokenizer

    from glmrt.server.logprobs import TokenTexts

    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    texts = TokenTexts(tokenizer)
    text = "你好 text<|user|>"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(texts(i)[1] for i in ids) == text.encode()
    assert texts(ids[0]) == ("\ufffd", "你".encode()[:1])
    assert texts(tokenizer.token_to_id("Ġtex")) == (" tex", b" tex")
    assert texts(59253) == ("<|user|>", b"<|user|>")
    entry = {59253: -0.5, ids[0]: -1.0}
    assert texts.chat([ids[0]], [entry], 1) == {"content": [{
        "token": "\ufffd", "logprob": -1.0, "bytes": [0xE4],
        "top_logprobs": [{"token": "<|user|>", "logprob": -0.5, "bytes": list(b"<|user|>")}]}]}
