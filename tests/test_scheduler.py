"""Block manager, scheduler and detokenizer in isolation (no model)."""
import pytest
import torch

from glmrt.engine.block_manager import BlockManager
from glmrt.engine.detokenizer import IncrementalDetokenizer
from glmrt.engine.scheduler import Scheduler
from glmrt.engine.sequence import Sequence, SequenceStatus
from glmrt.sampling_params import SamplingParams
from tests.tiny_checkpoint import build_tokenizer


def seq(name: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(
        request_id=name, prompt_token_ids=list(range(prompt_len)), prompt_positions=torch.zeros(3, prompt_len),
        rope_delta=0, sampling_params=SamplingParams(max_tokens=max_tokens), stop_token_ids=frozenset({-5}),
        max_total_tokens=prompt_len + max_tokens,
    )


def test_block_manager_allocates_appends_and_frees():
    bm = BlockManager(num_blocks=4, block_size=16)
    s = seq("a", 17)
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    for token in range(15):  # fills the second block (32 tokens) without a new block
        s.append_token(token)
        bm.append_slot(s)
    assert len(s.block_table) == 2
    s.append_token(1)  # token 33 needs a third block
    bm.append_slot(s)
    assert len(s.block_table) == 3
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and set(bm.ref_counts) == {0}


def test_prefill_respects_max_num_seqs_and_token_budget():
    sched = Scheduler(BlockManager(100, 16), max_num_seqs=2, max_num_batched_tokens=50)
    for name, n in [("a", 30), ("b", 30), ("c", 10)]:
        sched.add(seq(name, n))
    batch, is_prefill = sched.schedule()
    assert is_prefill and [s.request_id for s in batch] == ["a"]  # b would exceed 50 tokens
    batch, _ = sched.schedule()
    assert [s.request_id for s in batch] == ["b"]  # max_num_seqs=2 now reached
    batch, is_prefill = sched.schedule()
    assert not is_prefill and [s.request_id for s in batch] == ["a", "b"]


def test_long_prompt_runs_alone_rather_than_never():
    sched = Scheduler(BlockManager(100, 16), max_num_seqs=4, max_num_batched_tokens=32)
    sched.add(seq("long", 200))
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch[0].request_id == "long"


def test_decode_preempts_latest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=16)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=1000)
    a, b = seq("a", 32), seq("b", 32)
    sched.add(a)
    sched.add(b)
    sched.schedule()  # both prefilled: 4 blocks used
    a.append_token(7)
    b.append_token(7)  # both now need a third block, none is free
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a]
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b and b.block_table == []
    assert sched.num_preemptions == 1 and len(a.block_table) == 3


def test_finish_releases_blocks_wherever_the_sequence_is():
    bm = BlockManager(8, 16)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=1000)
    a, b = seq("a", 20), seq("b", 20)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    for s in (a, b):
        s.finish("abort")
        sched.finish(s)
    assert not sched.has_unfinished() and bm.num_free_blocks == 8


def test_stop_and_length_finish_reasons():
    s = seq("a", 4, max_tokens=3)
    s.append_token(1)
    s.append_token(-5)
    assert s.finish_reason == "stop"
    t = seq("b", 4, max_tokens=2)
    t.append_token(1)
    t.append_token(2)
    assert t.finish_reason == "length"


@pytest.mark.parametrize("text", ["plain ascii text", "你好, 世界 ✓ — émigré", "a\nb\tc  "])
def test_incremental_detokenizer_streams_whole_characters(text):
    tok = build_tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(lambda t: tok.decode(list(t)))
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.finish())
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
