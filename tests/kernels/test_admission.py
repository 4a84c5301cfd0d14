"""Admission (`admit_rows`) against its plain-torch twin and against the rows written out one by
one: random batches whose rows hold garbage (rows outside the admitted ones must keep it), odd
vocabularies, ids beyond the vocabulary, chunks after a history, with and without draft lengths."""
import numpy as np
import pytest
import torch

from glmrt.kernels.admission import BatchRows, Column, admit_rows, admit_rows_ref, float32_bits
from glmrt_testing.hopper import compile_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _garbage_rows(num_rows: int, max_blocks: int, vocab: int, drafts: bool, gen: torch.Generator) -> BatchRows:
    """A batch's row state full of random values (what earlier requests left behind)."""
    def ints(low=-(1 << 40), high=1 << 40, dtype=torch.int64):
        return torch.randint(low, high, (num_rows,), generator=gen, dtype=dtype)
    return BatchRows(
        block_tables=torch.randint(0, 1 << 30, (num_rows, max_blocks), generator=gen, dtype=torch.int32),
        context_lens=ints(0, 1 << 30, torch.int32), active=torch.rand(num_rows, generator=gen) < 0.5,
        rope_deltas=ints(), top_k=ints(), seeds=ints(), counters=ints(),
        temperature=torch.rand(num_rows, generator=gen), top_p=torch.rand(num_rows, generator=gen),
        penalty=torch.rand(num_rows, generator=gen) + 1, presence=torch.rand(num_rows, vocab, generator=gen) < 0.5,
        draft_lens=ints() if drafts else None)


def _on_device(rows: BatchRows) -> BatchRows:
    """A copy of the rows on DEVICE (each function under test writes its own)."""
    return BatchRows(*(None if t is None else t.to(DEVICE, copy=True) for t in rows))


def _case(n: int, vocab: int, gen: torch.Generator) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n admitted rows of a step of n + 2 chunks -> (admitted, tables [c, W], ids [T], history [H])."""
    chunks = n + 2
    width = int(torch.randint(1, 9, (1,), generator=gen))
    tables = torch.randint(0, 1 << 30, (chunks, width), generator=gen, dtype=torch.int32)
    lens = torch.randint(1, 2500, (chunks,), generator=gen)
    lens[torch.rand(chunks, generator=gen) < 0.3] = 1
    cu = [0] + lens.cumsum(0).tolist()
    ids = torch.randint(0, vocab + vocab // 4, (cu[-1],), generator=gen)  # some beyond the vocabulary
    history_lens = torch.randint(0, 3000, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.5)
    history = torch.randint(0, vocab + 50, (int(history_lens.sum()),), generator=gen)
    history_starts = [0] + history_lens.cumsum(0).tolist()[:-1]
    which = torch.randperm(chunks, generator=gen)[:n].tolist()  # the chunks that sample, any order
    admitted = np.zeros((n, len(Column)), dtype=np.int64)
    for i, c in enumerate(which):
        admitted[i, :Column.TABLE] = torch.randint(-(1 << 40), 1 << 40, (Column.TABLE,), generator=gen).tolist()
        admitted[i, Column.CONTEXT] = int(torch.randint(0, 1 << 30, (1,), generator=gen))  # an int32 length
        admitted[i, Column.TABLE:Column.TEMPERATURE] = [c, cu[c], cu[c + 1] - cu[c], history_starts[i], history_lens[i]]
    admitted[:, Column.TEMPERATURE:] = float32_bits(torch.rand(n, 3, generator=gen).numpy() * 2)
    return admitted, tables, ids, history


def _written_out(rows: BatchRows, first_row: int, admitted: np.ndarray, tables, ids, history) -> BatchRows:
    """What admission must leave, row by row in plain Python."""
    out = BatchRows(*(None if t is None else t.clone() for t in rows))
    vocab = rows.presence.shape[1]
    for i, a in enumerate(admitted.tolist()):
        r = first_row + i
        out.context_lens[r], out.rope_deltas[r] = a[Column.CONTEXT], a[Column.ROPE_DELTA]
        out.top_k[r], out.seeds[r], out.counters[r] = a[Column.TOP_K], a[Column.SEED], a[Column.COUNTER]
        if out.draft_lens is not None:
            out.draft_lens[r] = a[Column.DRAFT_LEN]
        floats = np.array(a[Column.TEMPERATURE:], dtype=np.int64).astype(np.int32).view(np.float32)
        out.temperature[r], out.top_p[r], out.penalty[r] = (float(x) for x in floats)
        out.active[r] = True
        out.block_tables[r] = 0
        out.block_tables[r, : tables.shape[1]] = tables[a[Column.TABLE]]
        out.presence[r] = False
        seen = ids[a[Column.IDS_START]: a[Column.IDS_START] + a[Column.IDS_LEN]].tolist()
        seen += history[a[Column.HISTORY_START]: a[Column.HISTORY_START] + a[Column.HISTORY_LEN]].tolist()
        for token in seen:
            if token < vocab:
                out.presence[r, token] = True
    return out


def _assert_rows_equal(got: BatchRows, expected: BatchRows) -> None:
    for name, g, e in zip(BatchRows._fields, got, expected):
        if e is None:
            assert g is None
        else:
            assert torch.equal(g.cpu(), e.cpu()), name


@pytest.mark.parametrize("drafts", [False, True])
@pytest.mark.parametrize("n, num_rows, vocab", [(1, 1, 64), (3, 7, 1000), (13, 40, 4099), (32, 33, 59392)])
def test_admit_rows_matches_reference_and_written_out(n, num_rows, vocab, drafts):
    gen = torch.Generator().manual_seed(n * 1000 + num_rows + drafts)
    rows = _garbage_rows(num_rows, 9, vocab, drafts, gen)
    admitted, tables, ids, history = _case(n, vocab, gen)
    first_row = int(torch.randint(0, num_rows - n + 1, (1,), generator=gen))
    expected = _written_out(rows, first_row, admitted, tables, ids, history)
    args = [torch.from_numpy(admitted).to(DEVICE), tables.to(DEVICE), ids.to(DEVICE), history.to(DEVICE)]
    for fn in (admit_rows, admit_rows_ref):
        got = _on_device(rows)
        fn(got, first_row, *args)
        _assert_rows_equal(got, expected)


def test_admit_rows_values():
    # vocabulary 8: row 1 of a 3-row batch takes chunk 1 (ids 5, 9, 2: 9 is beyond it) after history 3, 3
    rows = BatchRows(block_tables=torch.full((3, 4), 7, dtype=torch.int32), context_lens=torch.zeros(3, dtype=torch.int32),
                     active=torch.zeros(3, dtype=torch.bool), rope_deltas=torch.zeros(3, dtype=torch.int64),
                     top_k=torch.zeros(3, dtype=torch.int64), seeds=torch.zeros(3, dtype=torch.int64),
                     counters=torch.zeros(3, dtype=torch.int64), temperature=torch.zeros(3), top_p=torch.ones(3),
                     penalty=torch.ones(3), presence=torch.ones(3, 8, dtype=torch.bool), draft_lens=None)
    admitted = np.array([[5, -2, 8, 1 << 62, 2, 0, 1, 4, 3, 1, 2, 0, 0, 0]], dtype=np.int64)
    admitted[0, Column.TEMPERATURE:] = float32_bits([0.5, 0.9, 1.25])
    tables = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    ids, history = torch.tensor([0, 0, 0, 0, 5, 9, 2]), torch.tensor([6, 3, 3])
    for fn in (admit_rows, admit_rows_ref):
        got = _on_device(rows)
        fn(got, 1, torch.from_numpy(admitted).to(DEVICE), tables.to(DEVICE), ids.to(DEVICE), history.to(DEVICE))
        assert got.block_tables[1].tolist() == [3, 4, 0, 0] and got.block_tables[0].tolist() == [7] * 4
        assert got.presence[1].tolist() == [False, False, True, True, False, True, False, False]
        assert got.presence[2].all() and got.active.tolist() == [False, True, False]
        assert (got.context_lens[1], got.rope_deltas[1], got.top_k[1], got.seeds[1], got.counters[1]) == (5, -2, 8, 1 << 62, 2)
        assert got.temperature[1] == 0.5 and got.top_p[1] == pytest.approx(0.9) and got.penalty[1] == 1.25


def test_admit_rows_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    rows = _on_device(_garbage_rows(4, 3, 50, False, gen))
    admitted, tables, ids, history = (torch.from_numpy(a).to(DEVICE) if isinstance(a, np.ndarray) else a.to(DEVICE)
                                      for a in _case(2, 50, gen))
    tables = tables[:, :3].contiguous()
    with pytest.raises(ValueError, match="rows.presence must be"):
        admit_rows(rows._replace(presence=rows.presence.int()), 0, admitted, tables, ids, history)
    with pytest.raises(ValueError, match="admitted must have 14 columns"):
        admit_rows_ref(rows, 0, admitted[:, :-1].contiguous(), tables, ids, history)
    with pytest.raises(ValueError, match="tables must be"):
        admit_rows(rows, 0, admitted, tables.long(), ids, history)
    with pytest.raises(ValueError, match=r"rows \[3, 5\) are outside"):
        admit_rows(rows, 3, admitted, tables, ids, history)
    with pytest.raises(ValueError, match="blocks wide"):
        admit_rows(rows, 0, admitted, torch.zeros(3, 4, dtype=torch.int32, device=DEVICE), ids, history)


def test_admit_rows_kernel_compiles_for_sm90():
    pointers = ["admitted_ptr", "tables_ptr", "ids_ptr", "history_ptr", "block_tables_ptr", "context_ptr",
                "active_ptr", "deltas_ptr", "top_k_ptr", "seeds_ptr", "counters_ptr", "temperature_ptr",
                "top_p_ptr", "penalty_ptr", "draft_lens_ptr", "presence_ptr"]
    types = ["*i64", "*i32", "*i64", "*i64", "*i32", "*i32", "*u8", "*i64", "*i64", "*i64", "*i64", "*fp32",
             "*fp32", "*fp32", "*i64", "*u8"]
    sig = dict(zip(pointers, types))
    sig.update({name: "i32" for name in ("first_row", "stride_admitted", "stride_tables", "table_width",
                                         "max_blocks", "vocab")})
    sig.update(HAS_DRAFTS="constexpr", BLOCK="constexpr")
    compile_for_hopper([("glmrt.kernels.admission", "_admit_rows_kernel", sig, dict(HAS_DRAFTS=d, BLOCK=1024))
                        for d in (False, True)])
