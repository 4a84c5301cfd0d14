"""Stop strings: the matcher on its own, then end to end through glmrt.LLM, LLMEngine and AsyncEngine.

References are computed independently of the incremental matcher: by feeding the whole text one
character at a time and stopping at the first prefix that ends with a stop string, and, end to
end, from the model's own unstopped output decoded with transformers' tokenizer.
"""
import asyncio
import random

import pytest

import glmrt
from glmrt.engine.async_engine import AsyncEngine
from glmrt.engine.detokenizer import IncrementalDetokenizer
from glmrt.engine.engine import LLMEngine
from glmrt.engine.stop import StopChecker
from glmrt_testing.helpers import IMAGES
from glmrt_testing.tiny_checkpoint import build_tokenizer


def reference(text: str, stop: list[str], include: bool = False) -> tuple[str, str | None]:
    """(final text, stop string) by brute force: the shortest prefix of `text` that ends with a stop
    string ends it; among stop strings ending there, the longest is cut off."""
    for n in range(1, len(text) + 1):
        hits = [s for s in stop if text[:n].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:n] if include else text[:n - len(s)]), s
    return text, None


def stream(checker: StopChecker, deltas: list[str]) -> list[str]:
    """Feed deltas as a running request would; the last pop is the finished request's."""
    sent = []
    for d in deltas:
        checker.add(d)
        sent.append(checker.pop_delta(finished=checker.stop_str is not None))
        if checker.stop_str is not None:
            return sent
    sent.append(checker.pop_delta(finished=True))
    return sent


def test_stop_string_split_over_deltas_is_found_and_never_streamed():
    checker = StopChecker(["<|user|>"])
    assert checker.add("Hello <|") is None
    first = checker.pop_delta(finished=False)
    assert first == "Hello <|"[:-7]  # the last len(stop) - 1 characters are held back
    assert checker.add("us") is None and checker.add("er") is None
    assert checker.add("|> and more") == "<|user|>"
    assert checker.text == "Hello " and checker.stop_str == "<|user|>"
    assert first + checker.pop_delta(finished=False) == "Hello " == checker.sent_text
    assert checker.add("ignored once stopped") is None and checker.text == "Hello "


def test_held_back_text_is_released_as_more_text_arrives():
    checker = StopChecker(["abc"])
    checker.add("xxab")
    assert checker.pop_delta(finished=False) == "xx"
    checker.add("x")
    assert checker.pop_delta(finished=False) == "a"
    assert checker.pop_delta(finished=True) == "bx"
    assert checker.sent_text == "xxabx" and checker.stop_str is None


def test_multi_byte_characters_through_the_incremental_detokenizer():
    tok = build_tokenizer()  # byte-level: each of these characters spans several tokens
    text = "价格: 12€ — 你好世界 ✓ émigré 😀 end"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text)
    for stop in (["你好"], ["😀"], ["€ — 你"], ["é", "✓"], ["not there"]):
        detok, checker, sent = IncrementalDetokenizer(lambda t: tok.decode(list(t))), StopChecker(stop), []
        for i in ids:
            checker.add(detok.add_token(i))
            sent.append(checker.pop_delta(finished=checker.stop_str is not None))
            if checker.stop_str is not None:
                break
        else:
            checker.add(detok.finish())
            sent.append(checker.pop_delta(finished=True))
        assert (checker.text, checker.stop_str) == reference(text, stop)
        assert "".join(sent) == checker.text
        assert all("\ufffd" not in d for d in sent)


@pytest.mark.parametrize("stop,deltas", [
    (["world", "o"], ["hello world"]),  # "o" ends first, though listed second
    (["abcd", "bc"], ["xab", "cdy"]),  # "bc" ends before "abcd", which starts earlier
    (["abcd", "bc"], ["xabcdy"]),  # the same text in one delta: the same result
    (["bcd", "abcd"], ["xab", "cd"]),  # both end at the same character: the longer is cut off
    (["zz", "q"], ["aqzz"]),
])
def test_the_first_stop_string_to_end_wins_whatever_the_list_order(stop, deltas):
    text = "".join(deltas)
    for order in (stop, stop[::-1]):
        for include in (False, True):
            checker = StopChecker(order, include)
            sent = stream(checker, deltas)
            assert (checker.text, checker.stop_str) == reference(text, order, include)
            assert "".join(sent) == checker.text


def test_include_stop_str_in_output_keeps_the_stop_string_and_holds_nothing_back():
    checker = StopChecker(["END", "<|user|>"], include_stop_str_in_output=True)
    checker.add("some text <|us")
    assert checker.pop_delta(finished=False) == "some text <|us"
    assert checker.add("er|> tail") == "<|user|>"
    assert checker.text == "some text <|user|>"
    assert checker.pop_delta(finished=False) == "er|>"


def test_no_stop_strings_hold_nothing_back():
    checker = StopChecker([])
    assert checker.add("abc") is None and checker.pop_delta(finished=False) == "abc"


@pytest.mark.parametrize("seed", range(30))
def test_random_splits_stream_exactly_the_final_text(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c€") for _ in range(rng.randint(0, 60)))
    stop = ["".join(rng.choice("ab c€") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
    include = rng.random() < 0.3
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 20)))) if len(text) > 1 else []
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    expected_text, expected_stop = reference(text, stop, include)
    checker = StopChecker(stop, include)
    sent = stream(checker, deltas)
    assert (checker.text, checker.stop_str) == (expected_text, expected_stop)
    assert "".join(sent) == expected_text
    for n in range(len(sent)):  # what was sent at any point is never cut later
        assert expected_text.startswith("".join(sent[:n]))


# ------------------------------------------------------------------------------- end to end

MAX_TOKENS = 40
REQUESTS = [{"images": [IMAGES["small"]], "prompt": "Text Recognition:"},
            {"images": [], "prompt": "a text-only prompt"},
            {"images": [IMAGES["page"]], "prompt": "Table Recognition:"}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def unstopped(llm, hf_tokenizer):
    """Greedy token ids and their transformers decode, for each request, without stop strings."""
    outs = llm.generate(REQUESTS, glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert all(o.finish_reason == "length" for o in outs)
    return [(o.token_ids, hf_tokenizer.decode(o.token_ids, skip_special_tokens=True)) for o in outs]


def stop_in_middle(text: str) -> str:
    """Seven characters from the middle of the text: they straddle a token boundary."""
    return text[len(text) // 2: len(text) // 2 + 7]


def tokens_until(tokens, tokenizer, stop: str) -> list[int]:
    """The generated tokens up to and including the first one whose text completes `stop`."""
    n = next(n for n in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:n], skip_special_tokens=True))
    return tokens[:n]


def assert_all_free(engine: LLMEngine):
    """Everything is released when the request finishes; a step still in flight (with the
    finished request's next token) only has tokens to drop."""
    bm = engine.block_manager
    assert not engine.request_ids and not engine.scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.runner.image_cache and not engine.runner.batch.active.any()
    while engine.has_unfinished():
        assert engine.step() == []


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_stop_string_ends_the_request_and_frees_it(tiny_checkpoint, unstopped, hf_tokenizer, async_scheduling):
    llm = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch",
                    async_scheduling=async_scheduling)
    tokens, text = unstopped[0]
    stop = stop_in_middle(text)
    out = llm.generate(REQUESTS[0], glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop))[0]
    assert out.text == text[:text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.token_ids == tokens_until(tokens, hf_tokenizer, stop)
    assert_all_free(llm.engine)
    kept = llm.generate(REQUESTS[0], glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop],
                                                          include_stop_str_in_output=True))[0]
    assert kept.text == text[:text.index(stop) + len(stop)] and kept.token_ids == out.token_ids
    assert_all_free(llm.engine)


def test_mixed_batch_leaves_unstopped_requests_unchanged(llm, unstopped, hf_tokenizer):
    stops = [stop_in_middle(unstopped[0][1]), None, stop_in_middle(unstopped[2][1])]
    params = [glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=s) for s in stops]
    outs = llm.generate(REQUESTS, params)
    for out, stop, (tokens, text) in zip(outs, stops, unstopped):
        if stop is None:
            assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (tokens, text, "length", None)
        else:
            assert (out.text, out.finish_reason, out.stop_reason) == (text[:text.index(stop)], "stop", stop)
            assert out.token_ids == tokens_until(tokens, hf_tokenizer, stop)
    assert_all_free(llm.engine)


def test_stop_string_at_the_length_limit_finishes_with_stop(llm, unstopped, hf_tokenizer):
    tokens, text = unstopped[1]
    stop = stop_in_middle(text)
    n = len(tokens_until(tokens, hf_tokenizer, stop))
    out = llm.generate(REQUESTS[1], glmrt.SamplingParams(max_tokens=n, ignore_eos=True, stop=stop))[0]
    assert (out.finish_reason, out.stop_reason, len(out.token_ids)) == ("stop", stop, n)
    short = llm.generate(REQUESTS[1], glmrt.SamplingParams(max_tokens=n - 1, ignore_eos=True, stop=stop))[0]
    assert (short.finish_reason, short.stop_reason) == ("length", None)


def test_stop_reason_of_a_stop_token(llm, unstopped):
    tokens, _ = unstopped[0]
    token = tokens[5]
    out = llm.generate(REQUESTS[0], glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                         stop_token_ids=[token]))[0]
    assert out.token_ids == tokens[:tokens.index(token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", token)


def test_length_and_abort_stream_the_held_back_text(tiny_checkpoint, unstopped, hf_tokenizer):
    """A stop string whose start keeps appearing but which never completes: the held-back text
    comes out when the request ends, by length or by abort."""
    engine = LLMEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    tokens, text = unstopped[2]
    stop = stop_in_middle(text) + "\x00"
    params = glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)
    for abort_after in (None, 6):
        request_id = engine.add_request(REQUESTS[2], params)
        deltas, steps, out = [], 0, None
        while out is None:
            for o in engine.step():
                deltas.append(o.delta_text)
                assert o.text == "".join(deltas)
                if not o.finished:  # all but the last len(stop) - 1 characters so far
                    so_far = hf_tokenizer.decode(o.token_ids, skip_special_tokens=True)
                    assert o.text == so_far[:max(0, len(so_far) - (len(stop) - 1))]
                out = o if o.finished else None
            steps += 1
            if steps == abort_after:
                out = engine.abort(request_id)
                deltas.append(out.delta_text)
        assert out.text == "".join(deltas)
        if abort_after is None:
            assert (out.text, out.finish_reason, out.stop_reason) == (text, "length", None)
        else:
            assert out.finish_reason == "abort" and out.token_ids == tokens[:len(out.token_ids)]
            assert out.text == engine.processor.decode(out.token_ids, skip_special_tokens=True)
        while engine.has_unfinished():
            engine.step()
        assert_all_free(engine)


def test_async_engine_streams_only_text_that_stays(tiny_checkpoint, unstopped):
    async def main():
        engine = AsyncEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")

        async def collect(i, stop):
            params = glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)
            deltas, last = [], None
            async for out in engine.generate(REQUESTS[i], params):
                deltas.append(out.delta_text)
                last = out
            return deltas, last

        stops = [stop_in_middle(unstopped[0][1]), ["\x01", stop_in_middle(unstopped[1][1])], None]
        results = await asyncio.gather(*(collect(i, s) for i, s in enumerate(stops)))
        for (deltas, last), stop, (tokens, text) in zip(results, stops, unstopped):
            if stop is None:
                assert (last.text, last.finish_reason) == (text, "length")
                continue
            s = stop if isinstance(stop, str) else stop[1]
            assert (last.text, last.finish_reason, last.stop_reason) == (text[:text.index(s)], "stop", s)
            for n in range(len(deltas) + 1):  # no delta ever carried a piece of the stop string
                assert last.text.startswith("".join(deltas[:n]))
            assert "".join(deltas) == last.text
        for _ in range(100):  # the engine loop reads (and drops) the step still in flight
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        assert_all_free(engine.engine)
        engine.close()

    asyncio.run(main())


def run_to_end(engine: LLMEngine, request: dict, params: glmrt.SamplingParams, abort_after: int | None = None):
    """Every output of one request on `engine`, in order; aborted after `abort_after` steps if given."""
    request_id, outputs, steps = engine.add_request(request, params), [], 0
    while not outputs or not outputs[-1].finished:
        outputs += engine.step()
        steps += 1
        if steps == abort_after:
            outputs.append(engine.abort(request_id))
    while engine.has_unfinished():
        engine.step()
    return outputs


def test_a_final_only_request_gets_the_streamed_requests_last_output_once(tiny_checkpoint, unstopped):
    """output_kind "final_only": one output, when the request ends, equal to the streamed request's
    last one in every field, with every token and all the text as its delta; its text is decoded
    at the end (no stop strings) or as it streams (stop strings), and the ending is the same:
    length, a stop token kept out of the text or in it, a stop string, an abort."""
    engine = LLMEngine(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")
    tokens, text = unstopped[2]
    stop_token = tokens[7]
    cases = [
        (dict(), None),
        (dict(logprobs=2), None),
        (dict(stop_token_ids=[stop_token]), None),
        (dict(stop_token_ids=[stop_token], include_stop_str_in_output=True), None),
        (dict(stop=stop_in_middle(text)), None),
        (dict(stop=stop_in_middle(text) + "\x00"), 5),  # aborted while text is held back
        (dict(), 5),
    ]
    for options, abort_after in cases:
        params = glmrt.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **options)
        streamed = run_to_end(engine, REQUESTS[2], params, abort_after)
        final = run_to_end(engine, REQUESTS[2], glmrt.SamplingParams(**{**vars(params), "output_kind": "final_only"}),
                           abort_after)
        assert len(final) == 1 and final[0].finished, options
        last, out = streamed[-1], final[0]
        assert len(streamed) > 2 and out.finish_reason == last.finish_reason == ("abort" if abort_after else
                                                                                 last.finish_reason)
        for name in ("token_ids", "text", "finish_reason", "stop_reason", "logprobs", "error"):
            assert getattr(out, name) == getattr(last, name), (options, name)
        assert out.delta_text == out.text == "".join(o.delta_text for o in streamed)
        assert out.delta_token_ids == [t for o in streamed for t in o.delta_token_ids], options
    assert_all_free(engine)
