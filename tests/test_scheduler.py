"""Block manager, scheduler and detokenizer in isolation (no model)."""
import pytest
import torch
from tokenizers.decoders import DecodeStream

from glmrt.engine.block_manager import BlockManager
from glmrt.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from glmrt.engine.scheduler import NEEDS_DRAIN, Scheduler
from glmrt.engine.sequence import Sequence, SequenceStatus
from glmrt.sampling_params import SamplingParams
from glmrt_testing.tiny_checkpoint import build_tokenizer


def seq(name: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(
        request_id=name, prompt_token_ids=list(range(prompt_len)), prompt_positions=torch.zeros(3, prompt_len),
        rope_delta=0, sampling_params=SamplingParams(max_tokens=max_tokens), stop_token_ids=frozenset({5}),
        max_total_tokens=prompt_len + max_tokens, seed=0,
    )


class Rows:
    """Records the row moves the scheduler asks the device batch for."""

    def __init__(self):
        self.log = []

    def move_row(self, src, dst):
        self.log.append(("move", src, dst))

    def clear_row(self, row):
        self.log.append(("clear", row))


def scheduler(num_blocks, max_num_seqs=4, max_num_batched_tokens=1000, chunked_prefill=False):
    return Scheduler(BlockManager(num_blocks, 16), max_num_seqs, max_num_batched_tokens, Rows(),
                     chunked_prefill=chunked_prefill)


def chunks_of(step):
    return [(c.seq.request_id, c.start, c.end, c.samples) for c in step.chunks]


def read_back(step, token=7):
    """What the engine does when a step's tokens arrive."""
    for s in step.seqs:
        s.num_pending -= 1
        s.append_token(token)


def test_block_manager_allocates_grows_and_frees():
    bm = BlockManager(num_blocks=4, block_size=16)
    s = seq("a", 17)
    assert bm.can_allocate(17) and not bm.can_allocate(65)
    bm.allocate(s, 17)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    assert all(bm.grow(s, n) is None for n in range(18, 33))  # the second block holds tokens 17..32
    new = bm.grow(s, 33)
    assert new is not None and s.block_table[-1] == new and len(s.block_table) == 3
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and not bm.used_block_ids
    s.block_table = [new]  # a table that still lists a freed block: freeing it again is refused
    with pytest.raises(AssertionError, match=f"frees block {new}, which is free"):
        bm.free(s)


def test_prefill_respects_max_num_seqs_and_token_budget():
    sched = scheduler(100, max_num_seqs=2, max_num_batched_tokens=50)
    for name, n in [("a", 30), ("b", 30), ("c", 10)]:
        sched.add(seq(name, n))
    step = sched.schedule()
    assert step.is_prefill and [s.request_id for s in step.seqs] == ["a"] and step.first_row == 0
    step = sched.schedule()  # b would have exceeded 50 tokens together with a; a decodes first
    assert not step.is_prefill and [s.request_id for s in step.seqs] == ["a"]
    step = sched.schedule()
    assert step.is_prefill and [s.request_id for s in step.seqs] == ["b"] and step.first_row == 1
    step = sched.schedule()  # max_num_seqs=2 reached: c waits, a and b decode
    assert not step.is_prefill and [s.request_id for s in step.seqs] == ["a", "b"]
    assert [s.num_pending for s in step.seqs] == [3, 2]  # steps scheduled but not yet read
    step = sched.schedule()  # still no room for c
    assert not step.is_prefill and [s.request_id for s in step.seqs] == ["a", "b"]


def test_running_streams_stall_for_one_prefill_at_a_time():
    """Arrivals beyond one step's budget are prefilled one step at a time with a decode step of
    the running sequences between them; with nothing running, a prefill may follow a prefill."""
    sched = scheduler(100, max_num_seqs=8, max_num_batched_tokens=40)
    for name in "abcd":
        sched.add(seq(name, 30))
    kinds = []
    while sched.waiting:
        step = sched.schedule()
        kinds.append(("prefill " if step.is_prefill else "decode ") + "".join(s.request_id for s in step.seqs))
    assert kinds == ["prefill a", "decode a", "prefill b", "decode ab", "prefill c", "decode abc", "prefill d"]
    assert not sched.schedule().is_prefill
    idle = scheduler(100, max_num_seqs=8, max_num_batched_tokens=40)
    idle.add(seq("x", 30))
    assert idle.schedule().is_prefill
    idle.running[0].finish("abort")
    idle.finish(idle.running[0])
    idle.add(seq("y", 30))
    assert idle.schedule().is_prefill  # nothing runs: no decode step to wait for


def test_long_prompt_runs_alone_rather_than_never():
    sched = scheduler(100, max_num_batched_tokens=32)
    sched.add(seq("long", 200))
    step = sched.schedule()
    assert step.is_prefill and step.seqs[0].request_id == "long"


def test_decode_counts_scheduled_tokens_and_hands_out_new_blocks():
    sched = scheduler(8)
    a = seq("a", 31)
    sched.add(a)
    sched.schedule()  # prefill: 31 tokens cached, 2 blocks, token 32 pending
    step = sched.schedule()  # decode feeds token 32 (cache index 31): still block 2
    assert step.new_blocks == [] and a.num_reserved == 32
    read_back(sched.schedule())  # feeds cache index 32: a third block, before a token is read
    assert a.num_reserved == 33 and len(a.block_table) == 3


def test_decode_drains_then_preempts_latest_and_requeues_it_first():
    sched = scheduler(4)
    a, b = seq("a", 32), seq("b", 32)
    sched.add(a)
    sched.add(b)
    prefill = sched.schedule()  # both prefilled: 4 blocks used, a token each in flight
    assert sched.schedule() == NEEDS_DRAIN  # both need a third block; in-flight tokens first
    read_back(prefill)
    step = sched.schedule()
    assert not step.is_prefill and step.seqs == [a]
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b and b.block_table == []
    assert b.row is None and b.num_reserved == 0 and b.output_token_ids == [7]
    assert sched.num_preemptions == 1 and len(a.block_table) == 3
    assert sched.rows.log == [("clear", 1)]


def test_leaving_rows_are_filled_by_the_last_row():
    sched = scheduler(100)
    seqs = [seq(name, 10) for name in "abcd"]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    seqs[1].finish("abort")
    sched.finish(seqs[1])
    assert sched.running == [seqs[0], seqs[3], seqs[2]] and seqs[3].row == 1
    assert sched.rows.log == [("move", 3, 1), ("clear", 3)]


def test_sequence_with_its_last_token_scheduled_drains_without_a_row():
    sched = scheduler(100)
    a, b = seq("a", 10, max_tokens=2), seq("b", 10)
    sched.add(a)
    sched.add(b)
    prefill = sched.schedule()
    decode = sched.schedule()  # a's second and last token is scheduled
    read_back(prefill)
    step = sched.schedule()  # a leaves its row; b moves into row 0
    assert step.seqs == [b] and b.row == 0 and a.row is None
    assert a.status == SequenceStatus.DRAINING and a.block_table and sched.draining == [a]
    read_back(decode)
    assert a.finish_reason == "length"
    sched.finish(a)
    assert sched.draining == [] and a.block_table == []


def test_finish_releases_blocks_wherever_the_sequence_is():
    bm = BlockManager(8, 16)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=1000, rows=Rows())
    a, b = seq("a", 20), seq("b", 20)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    for s in (a, b):  # running, waiting
        s.finish("abort")
        sched.finish(s)
    assert not sched.has_unfinished() and bm.num_free_blocks == 8


def test_chunked_prefill_runs_chunks_within_the_budget_beside_the_decode_rows():
    sched = scheduler(100, max_num_batched_tokens=20, chunked_prefill=True)
    a, b, c = seq("a", 10), seq("b", 50), seq("c", 5)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()  # nothing runs yet: prefill only; b's first chunk takes the rest of the budget
    assert step.is_prefill and chunks_of(step) == [("a", 0, 10, True), ("b", 0, 10, False)]
    assert step.seqs == [a] and step.first_row == 0 and sched.prefilling == [b] and b.row is None
    assert b.status == SequenceStatus.PREFILLING and len(b.block_table) == 4  # all its blocks, at admission
    step = sched.schedule()  # a decodes (1 token), b continues with 19; c waits behind b
    assert step.decode == [a] and chunks_of(step) == [("b", 10, 29, False)] and step.seqs == [a]
    read_back(step)
    step = sched.schedule()
    assert chunks_of(step) == [("b", 29, 48, False)]
    step = sched.schedule()  # b's last chunk samples its first token and takes row 1; c starts
    assert step.decode == [a] and chunks_of(step) == [("b", 48, 50, True), ("c", 0, 5, True)]
    assert step.seqs == [a, b, c] and step.first_row == 1 and (b.row, c.row) == (1, 2)
    assert b.num_pending == 1 and b.num_reserved == 50 and sched.prefilling == []
    step = sched.schedule()
    assert step.decode == [a, b, c] and step.chunks == []


def test_chunked_prefill_budget_counts_vision_patches_after_the_first_chunk():
    sched = scheduler(100, max_num_batched_tokens=40, chunked_prefill=True)
    a, b, c = seq("a", 10), seq("b", 10), seq("c", 10)
    b.pixel_values = torch.zeros(25, 588, dtype=torch.uint8)  # 25 patches: 10 + 25 + 10 > 40 - 10
    c.pixel_values = torch.zeros(100, 588, dtype=torch.uint8)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert chunks_of(step) == [("a", 0, 10, True), ("b", 0, 5, False)]
    b.pixel_values = None  # encoded by that step
    step = sched.schedule()  # c's 100 patches exceed the budget: it waits for a step of its own
    assert chunks_of(step) == [("b", 5, 10, True)]
    step = sched.schedule()  # the first chunk of a step always runs, whatever its images cost
    assert step.decode == [a, b] and chunks_of(step) == [("c", 0, 10, True)]


def test_chunked_prefill_preempts_prefilling_sequences_first_without_draining():
    sched = scheduler(4, max_num_batched_tokens=20, chunked_prefill=True)
    a, b = seq("a", 16), seq("b", 40)
    sched.add(a)
    sched.add(b)
    sched.schedule()  # a whole (1 block), b's first 4 tokens (b holds all 3 of its blocks)
    assert sched.prefilling == [b] and sched.block_manager.num_free_blocks == 0
    step = sched.schedule()  # a's token 17 needs a block: b is preempted, a's first token still in flight
    assert step.decode == [a] and step.chunks == [] and a.num_pending == 2
    assert sched.waiting[0] is b and b.status == SequenceStatus.WAITING and b.num_reserved == 0
    assert b.block_table == [] and sched.num_preemptions == 1 and sched.prefilling == []


def test_a_structured_output_row_decodes_in_mixed_steps_like_any_row():
    """A constrained row is a row attribute, not a scheduling mode: b's prompt is prefilled in the
    same steps as a's decode tokens (19 + 1 tokens, then 11 + 1), as without a constraint."""
    sched = scheduler(100, max_num_batched_tokens=20, chunked_prefill=True)
    a, b = seq("a", 10), seq("b", 30)
    a.grammar = object()  # the engine fills its mask between the step's forward and its sampling
    sched.add(a)
    sched.schedule()
    sched.add(b)
    kinds = [(len(step.decode), chunks_of(step)) for step in (sched.schedule() for _ in range(2))]
    assert kinds == [(1, [("b", 0, 19, False)]), (1, [("b", 19, 30, True)])]


def test_finishing_a_prefilling_sequence_frees_its_blocks():
    sched = scheduler(10, max_num_batched_tokens=20, chunked_prefill=True)
    a = seq("a", 50)
    sched.add(a)
    sched.schedule()
    assert sched.prefilling == [a] and sched.block_manager.num_free_blocks == 6
    a.finish("abort")
    sched.finish(a)
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 10


def test_length_is_checked_before_stop():
    s = seq("a", 4, max_tokens=3)
    s.num_pending = 3
    s.append_token(1)
    s.append_token(5)  # the stop token
    assert s.finish_reason == "stop"
    t = seq("b", 4, max_tokens=2)
    t.num_pending = 2
    t.append_token(1)
    t.append_token(5)  # the stop token as the max_tokens-th token: "length", as in vLLM
    assert t.finish_reason == "length"


def decoders(tok):
    """The detokenizer's two ways: tokenizers' DecodeStream (a TokenDecoder) and the window method
    (any other decode function)."""
    return {"stream": TokenDecoder(tok, False), "window": lambda t: tok.decode(list(t))}


@pytest.mark.parametrize("way", ["stream", "window"])
@pytest.mark.parametrize("text", ["plain ascii text", "你好, 世界 ✓ — émigré", "a\nb\tc  "])
def test_incremental_detokenizer_streams_whole_characters(text, way):
    tok = build_tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(decoders(tok)[way])
    deltas = [detok.add_token(i) for i in ids]
    assert "".join(deltas) == text  # all of it before finish: nothing is left held back
    deltas.append(detok.finish())
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("way", ["stream", "window"])
def test_any_token_sequence_streams_a_prefix_of_its_decode(way, skip):
    """Random ids (special tokens and bytes that are no UTF-8 among them), one or several per step:
    the streamed text is always a prefix of the plain decode, which is the final text."""
    import random

    tok = build_tokenizer()
    decode = TokenDecoder(tok, skip) if way == "stream" else (lambda t: tok.decode(list(t), skip_special_tokens=skip))
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        detok, i = IncrementalDetokenizer(decode), 0
        while i < len(ids):
            n = rng.randrange(1, 4)
            for token in ids[i: i + n]:
                detok.add_token(token)
            i += n
            assert tok.decode(ids[:i], skip_special_tokens=skip).startswith(detok.text)
        detok.finish()
        assert detok.text == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [False, True])
def test_byte_level_lookups_stream_what_the_stream_alone_does(skip):
    """A byte-level tokenizer's tokens are looked up by their own text where that is exact: every
    step's delta is the one tokenizers' DecodeStream alone gives, over random ids (special tokens,
    bytes that split characters or are no UTF-8) and over text with multi-byte characters."""
    import random

    tok = build_tokenizer()
    decoder, alone = TokenDecoder(tok, skip), TokenDecoder(tok, skip)
    alone.texts = None
    assert decoder.texts == {}  # the test tokenizer's decoder is byte-level
    rng = random.Random(11)
    texts = ["你好, 世界 ✓ — émigré", "plain ascii text", "a\nb\tc  ", "\ufffd ok \ufffd"]
    cases = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    cases += [[rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    for ids in cases:
        fast, slow = IncrementalDetokenizer(decoder), IncrementalDetokenizer(alone)
        assert [fast.add_token(i) for i in ids] == [slow.add_token(i) for i in ids], ids
        assert fast.finish() == slow.finish() and fast.text == tok.decode(ids, skip_special_tokens=skip)
    looked_up = [t for t, text in decoder.texts.items() if text is not None]
    assert len(looked_up) > 100 and any(text is None for text in decoder.texts.values())


def test_a_stream_that_fails_on_an_invalid_prefix_starts_over_from_that_token(monkeypatch):
    tok = build_tokenizer()
    ids = tok.encode("one two three", add_special_tokens=False).ids
    decoder, streams = TokenDecoder(tok, False), []

    class Failing:  # tokenizers' error on the 4th token of the first stream
        def __init__(self):
            self.inner, self.steps = DecodeStream(skip_special_tokens=False), 0
            streams.append(self)

        def step(self, tokenizer, token):
            self.steps += 1
            if len(streams) == 1 and self.steps == 4:
                raise Exception("Invalid prefix encountered while decoding stream")
            return self.inner.step(tokenizer, token)

    monkeypatch.setattr(decoder, "stream", Failing)
    monkeypatch.setattr(decoder, "texts", None)  # every token through the stream (no byte-level lookups)
    detok = IncrementalDetokenizer(decoder)
    streamed = "".join(detok.add_token(i) for i in ids)
    assert len(streams) == 2 and streamed.startswith(tok.decode(ids[:3])) and streamed.endswith("three")
    detok.finish()
    assert detok.text == "one two three"
    other = TokenDecoder(tok, False)
    monkeypatch.setattr(other, "stream", lambda: type("Broken", (), {"step": lambda *a: 1 / 0})())
    monkeypatch.setattr(other, "texts", None)
    with pytest.raises(ZeroDivisionError):  # any other error is the request's own (it fails alone)
        IncrementalDetokenizer(other).add_token(ids[0])
