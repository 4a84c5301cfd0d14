"""The step-input kernels against their plain-torch twins. Decode inputs (the engine's former torch
code): context lengths advanced in place, slots and positions exactly equal, on random batches
laid out as the engine's DeviceBatch holds them (rows [0, bs) of wider buffers). Prefill slots:
ragged chunks after cached prefixes, against the slot arithmetic written out token by token."""
import pytest
import torch

from glmrt.kernels.decode_inputs import decode_inputs_, decode_inputs_ref, prefill_slots, prefill_slots_ref
from glmrt_testing.hopper import compile_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(bs: int, block_size: int, max_blocks: int, gen: torch.Generator, table_len: int = 0) -> dict:
    """Decode state of rows [0, bs) as DeviceBatch slices it from max_rows = bs + 3 rows: random
    block tables; contexts ragged over the whole table (on and either side of block boundaries, 0,
    and the full table: its next token falls outside); about a third of the rows inactive. With
    table_len, GLM-Image's decode-position tables [bs, 3, table_len] with prompt lengths either side
    of the contexts (column clamped at 0) and table lengths shorter than the generated count
    (clamped at the end)."""
    rows, limit = bs + 3, max_blocks * block_size
    boundaries = torch.randint(0, max_blocks + 1, (rows,), generator=gen) * block_size
    context = (boundaries + torch.randint(-1, 2, (rows,), generator=gen)).clamp(0, limit)
    random = torch.randint(0, limit + 1, (rows,), generator=gen)
    context = torch.where(torch.rand(rows, generator=gen) < 0.5, context, random)
    context[0] = limit  # active: its token's index is the first outside the table
    active = torch.rand(rows, generator=gen) < 0.67
    active[0] = True
    context[~active & (torch.rand(rows, generator=gen) < 0.5)] = 0  # as clear_row leaves a row
    state = dict(
        context_lens=context.int(), active=active,
        block_tables=torch.randint(0, 10_000, (rows, max_blocks), generator=gen, dtype=torch.int32),
        rope_deltas=torch.randint(-500, 500, (rows,), generator=gen),
    )
    if table_len:
        state["decode_positions"] = torch.randint(0, 1 << 40, (rows, 3, table_len), generator=gen)
        state["prompt_lens"] = torch.randint(0, limit + 1, (rows,), generator=gen)
        state["decode_lens"] = torch.randint(1, table_len + 1, (rows,), generator=gen)
    return {k: v.to(DEVICE)[:bs] for k, v in state.items()}


def _run(fn, state: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (context_lens after, slots, positions) of fn on a copy of the state (its rows' buffers)."""
    state = {k: v.clone() for k, v in state.items()}
    slots, positions = fn(state["context_lens"], state["active"], state["block_tables"], block_size,
                          state["rope_deltas"], state.get("decode_positions"), state.get("prompt_lens"),
                          state.get("decode_lens"))
    return state["context_lens"], slots, positions


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("bs", [1, 2, 5, 8, 13, 32])
@pytest.mark.parametrize("table_len", [0, 1, 7, 300])
def test_decode_inputs_match_reference(bs, block_size, table_len):
    gen = torch.Generator().manual_seed(bs * 1000 + block_size + table_len)
    max_blocks = int(torch.randint(1, 12, (1,), generator=gen))
    state = _batch(bs, block_size, max_blocks, gen, table_len)
    context, slots, positions = _run(decode_inputs_, state, block_size)
    ref_context, ref_slots, ref_positions = _run(decode_inputs_ref, state, block_size)
    assert torch.equal(context, ref_context)
    assert torch.equal(context, state["context_lens"] + state["active"].int())
    assert slots.dtype == positions.dtype == torch.int64
    assert slots.shape == (bs,) and positions.shape == (3, bs)
    assert torch.equal(slots, ref_slots)
    assert torch.equal(positions, ref_positions)
    assert (slots[~state["active"]] == -1).all()
    assert slots[0] == -1  # active, but its token's index lies past the table


def test_decode_inputs_values():
    # block_size 4, two rows of 3 blocks; row 1 inactive, row 2 at the start of its second block
    tables = torch.tensor([[7, 2, 9], [5, 5, 5], [1, 3, 8]], dtype=torch.int32, device=DEVICE)
    context = torch.tensor([2, 6, 4], dtype=torch.int32, device=DEVICE)
    active = torch.tensor([True, False, True], device=DEVICE)
    deltas = torch.tensor([0, 10, -3], device=DEVICE)
    slots, positions = decode_inputs_(context, active, tables, 4, deltas)
    assert context.tolist() == [3, 6, 5]
    assert slots.tolist() == [7 * 4 + 2, -1, 3 * 4 + 0]
    assert positions.tolist() == [[2, 15, 1]] * 3
    table = torch.arange(2 * 3 * 4, device=DEVICE).view(2, 3, 4) * 10  # GLM-Image, rows 0 and 2
    lens = torch.tensor([4, 4], device=DEVICE)
    keep = torch.tensor([0, 2], device=DEVICE)
    _, positions = decode_inputs_(context[keep], active[keep], tables[keep], 4, deltas[keep], table,
                                  torch.tensor([1, 9], device=DEVICE), lens)
    # row 0: pos 3 - prompt 1 = column 2; row 2: pos 5 - prompt 9 < 0, column 0
    assert positions.tolist() == [[20, 120], [60, 160], [100, 200]]


def test_decode_inputs_rejects_bad_arguments():
    tables = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    deltas = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="context_lens must be"):
        decode_inputs_(torch.zeros(2, dtype=torch.int64, device=DEVICE), active, tables, 16, deltas)
    context = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_tables must be"):
        decode_inputs_(context, active, tables.long(), 16, deltas)
    with pytest.raises(ValueError, match="prompt_lens must be"):
        decode_inputs_(context, active, tables, 16, deltas, torch.zeros(2, 3, 5, dtype=torch.int64, device=DEVICE),
                       None, deltas)


def test_decode_inputs_kernel_compiles_for_sm90():
    sig = {"context_ptr": "*i32", "active_ptr": "*u8", "tables_ptr": "*i32", "deltas_ptr": "*i64",
           "table_pos_ptr": "*i64", "prompt_lens_ptr": "*i64", "decode_lens_ptr": "*i64", "slots_ptr": "*i64",
           "positions_ptr": "*i64", "stride_table": "i32", "stride_pr": "i32", "stride_pa": "i32",
           "stride_pc": "i32", "stride_out": "i32", "block_size": "i32", "max_blocks": "i32",
           "TABLE_POSITIONS": "constexpr"}
    compile_for_hopper([("glmrt.kernels.decode_inputs", "_decode_inputs_kernel", sig, dict(TABLE_POSITIONS=t))
                        for t in (False, True)])


def _prefill_slots_by_token(lens: list[int], starts: list[int], tables: torch.Tensor, block_size: int) -> list[int]:
    """Each chunk's tokens' slots, one token at a time: block (index // block_size) of its table,
    at index % block_size; -1 past the table."""
    slots, limit = [], tables.shape[1] * block_size
    for i, (n, start) in enumerate(zip(lens, starts)):
        for index in range(start, start + n):
            slots.append(int(tables[i, index // block_size]) * block_size + index % block_size if index < limit else -1)
    return slots


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5, 21, 64])
def test_prefill_slots_match_reference_and_token_by_token(num_chunks, block_size):
    gen = torch.Generator().manual_seed(num_chunks * 100 + block_size)
    max_blocks = int(torch.randint(1, 40, (1,), generator=gen))
    limit = max_blocks * block_size
    lens = torch.randint(1, 300, (num_chunks,), generator=gen)
    lens[torch.rand(num_chunks, generator=gen) < 0.3] = 1  # single-token chunks among them
    starts = torch.randint(0, limit + 1, (num_chunks,), generator=gen)
    starts[torch.rand(num_chunks, generator=gen) < 0.4] = 0  # whole prompts
    starts = torch.minimum(starts, (limit - lens).clamp(min=0))  # mostly inside the table ...
    starts[-1], lens[-1] = limit - 1, max(int(lens[-1]), 2)  # ... and one chunk that runs past it (-1 there)
    cu = torch.zeros(num_chunks + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    tables = torch.randint(0, 100_000, (num_chunks, max_blocks), generator=gen, dtype=torch.int32)
    args = [t.to(DEVICE) for t in (cu, starts.int(), tables)]
    total = int(cu[-1])
    slots = prefill_slots(*args, block_size, total)
    assert slots.dtype == torch.int64 and slots.shape == (total,)
    assert torch.equal(slots, prefill_slots_ref(*args, block_size, total))
    assert slots.tolist() == _prefill_slots_by_token(lens.tolist(), starts.tolist(), tables, block_size)
    assert slots[-1] == -1


def test_prefill_slots_values():
    # block_size 4: chunk 0 is a whole 6-token prompt; chunk 1 three tokens from cache index 3 on
    tables = torch.tensor([[7, 2], [5, 9]], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 6, 9], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    expected = [28, 29, 30, 31, 8, 9, 23, 36, 37]
    assert prefill_slots(cu, starts, tables, 4, 9).tolist() == expected
    assert prefill_slots_ref(cu, starts, tables, 4, 9).tolist() == expected


def test_prefill_slots_rejects_bad_arguments():
    tables = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    starts = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        prefill_slots(cu.long(), starts, tables, 16, 5)
    with pytest.raises(ValueError, match="block_tables must be"):
        prefill_slots(cu, starts, tables[:1], 16, 5)
    with pytest.raises(ValueError, match="a prefill needs a chunk"):
        prefill_slots_ref(cu[:1], starts[:0], tables[:0], 16, 0)


def test_prefill_slots_kernel_compiles_for_sm90():
    sig = {"cu_ptr": "*i32", "starts_ptr": "*i32", "tables_ptr": "*i32", "slots_ptr": "*i64", "num_tokens": "i32",
           "num_chunks": "i32", "search_steps": "i32", "stride_table": "i32", "block_size": "i32",
           "max_blocks": "i32", "BLOCK": "constexpr"}
    compile_for_hopper([("glmrt.kernels.decode_inputs", "_prefill_slots_kernel", sig, dict(BLOCK=128))])


@pytest.mark.gpu
def test_decode_inputs_cuda_graph_replay():
    # captured once at a fixed batch, replayed over three steps of the same rows: each replay
    # advances the contexts and reads the state as it then is
    gen = torch.Generator().manual_seed(0)
    for table_len in (0, 50):
        state = _batch(32, 16, 8, gen, table_len)
        ref = {k: v.clone() for k, v in state.items()}
        _run(decode_inputs_, state, 16)  # compile outside the capture (on a copy of the state)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            slots, positions = decode_inputs_(state["context_lens"], state["active"], state["block_tables"], 16,
                                              state["rope_deltas"], state.get("decode_positions"),
                                              state.get("prompt_lens"), state.get("decode_lens"))
        for _ in range(3):
            graph.replay()
            ref_slots, ref_positions = decode_inputs_ref(ref["context_lens"], ref["active"], ref["block_tables"], 16,
                                                         ref["rope_deltas"], ref.get("decode_positions"),
                                                         ref.get("prompt_lens"), ref.get("decode_lens"))
            assert torch.equal(state["context_lens"], ref["context_lens"])
            assert torch.equal(slots, ref_slots) and torch.equal(positions, ref_positions)
