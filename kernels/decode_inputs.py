"""A step's inputs on the device, each in one launch: a decode step's from the device-resident
batch (`decode_inputs_`), and the KV slots of a step's prefill chunks (`prefill_slots`).

Each row r of a decode step feeds one token, its last sampled one, at cache index
pos = context_lens[r] - 1 after the step's context_lens += active (inactive rows keep their
context and write no KV). From that one index come the KV-cache slot (through the row's block
table) and the row's M-RoPE positions [3]: pos + rope_delta on every axis for GLM-OCR (a generated
token's three positions are equal), or for GLM-Image the row's precomputed decode positions at
column pos - prompt_len, clamped to its table.

In plain torch (`decode_inputs_ref`) this is 17 tiny ops, each a node of the captured decode graph
(and a launch of an eager step). The kernel is one launch of one program per row, each a few scalar
loads and stores: its cost is the launch itself. Static shapes, no host sync: it is captured with
the rest of the step.

A prefill chunk covers cache indices [start, start + n) of its sequence, and its tokens' KV slots
go through its block table. The host would build them token by token (a few numpy calls per chunk,
~10 us each for a step of region crops); `prefill_slots` makes them from the chunks' block tables,
starts and cu_seqlens: one program per 128 tokens, each token's chunk found by a binary search of
cu_seqlens.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _decode_inputs_kernel(
    context_ptr, active_ptr, tables_ptr, deltas_ptr, table_pos_ptr, prompt_lens_ptr, decode_lens_ptr,
    slots_ptr, positions_ptr,
    stride_table, stride_pr, stride_pa, stride_pc, stride_out, block_size, max_blocks,
    TABLE_POSITIONS: tl.constexpr,
):
    # grid (bs,): row r advances context_lens[r] in place, writes slots[r] and positions[:, r]
    row = tl.program_id(0)
    active = tl.load(active_ptr + row).to(tl.int32)  # bool stored as a byte
    context = tl.load(context_ptr + row) + active  # int32
    tl.store(context_ptr + row, context)
    pos = (context - 1).to(tl.int64)  # cache index of the token fed in this step
    limit = max_blocks * block_size
    # the index clamped into the table, as the reference gathers: outside it, a valid entry read, then -1
    block = tl.load(tables_ptr + row * stride_table + tl.minimum(tl.maximum(pos, 0), limit - 1) // block_size)
    slot = block.to(tl.int64) * block_size + pos % block_size
    tl.store(slots_ptr + row, tl.where((active != 0) & (pos >= 0) & (pos < limit), slot, -1))
    axes = tl.arange(0, 4)  # the 3 M-RoPE axes (t, h, w), padded to a power of two
    if TABLE_POSITIONS:  # GLM-Image: column pos - prompt_len of the row's table, clamped to it
        column = tl.maximum(pos - tl.load(prompt_lens_ptr + row), 0)
        column = tl.minimum(column, tl.load(decode_lens_ptr + row) - 1)
        positions = tl.load(table_pos_ptr + row * stride_pr + axes * stride_pa + column * stride_pc, mask=axes < 3)
    else:  # GLM-OCR: a generated token's three positions are equal
        positions = tl.zeros([4], tl.int64) + pos + tl.load(deltas_ptr + row)
    tl.store(positions_ptr + axes * stride_out + row, positions, mask=axes < 3)


def _check(context_lens: torch.Tensor, active: torch.Tensor, block_tables: torch.Tensor, rope_deltas: torch.Tensor,
           decode_positions: torch.Tensor | None, prompt_lens: torch.Tensor | None,
           decode_lens: torch.Tensor | None) -> None:
    bs = context_lens.shape[0]
    expected = [("context_lens", context_lens, (bs,), torch.int32), ("active", active, (bs,), torch.bool),
                ("rope_deltas", rope_deltas, (bs,), torch.int64)]
    if decode_positions is not None:
        expected += [("decode_positions", decode_positions, (bs, 3, decode_positions.shape[-1]), torch.int64),
                     ("prompt_lens", prompt_lens, (bs,), torch.int64), ("decode_lens", decode_lens, (bs,), torch.int64)]
    for name, t, shape, dtype in expected:
        if t is None or t.shape != shape or t.dtype != dtype or t.device != context_lens.device:
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"
            raise ValueError(f"{name} must be a {list(shape)} {dtype} tensor on {context_lens.device}, got {got}")
    if block_tables.dim() != 2 or block_tables.shape[0] != bs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be a [{bs}, max_blocks] int32 tensor, "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype}")
    for name, t in (("context_lens", context_lens), ("active", active), ("rope_deltas", rope_deltas),
                    ("prompt_lens", prompt_lens), ("decode_lens", decode_lens), ("block_tables", block_tables)):
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def decode_inputs_(context_lens: torch.Tensor, active: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                   rope_deltas: torch.Tensor, decode_positions: torch.Tensor | None = None,
                   prompt_lens: torch.Tensor | None = None,
                   decode_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance bs rows by one token: context_lens [bs] int32 += active [bs] bool, in place ->
    (slot_mapping [bs] int64: the fed token's KV slot through block_tables [bs, max_blocks] int32,
    -1 for an inactive row or an index outside the table; positions [3, bs] int64: pos +
    rope_deltas [bs] on every axis, or with decode_positions [bs, 3, L] int64 (GLM-Image) its column
    pos - prompt_lens [bs], clamped to [0, decode_lens [bs] - 1]). pos = the new context_lens - 1.
    One launch, no host sync: capturable in a CUDA graph."""
    _check(context_lens, active, block_tables, rope_deltas, decode_positions, prompt_lens, decode_lens)
    bs = context_lens.shape[0]
    slots = torch.empty(bs, dtype=torch.int64, device=context_lens.device)
    positions = torch.empty(3, bs, dtype=torch.int64, device=context_lens.device)
    if bs:
        table = decode_positions is not None
        # Without a table, its pointer arguments are never read: any int64 tensor stands in.
        table_pos, prompts, lens = (decode_positions, prompt_lens, decode_lens) if table else (rope_deltas,) * 3
        strides = decode_positions.stride() if table else (0, 0, 0)
        _decode_inputs_kernel[(bs,)](
            context_lens, active.view(torch.uint8), block_tables, rope_deltas, table_pos, prompts, lens,
            slots, positions, block_tables.stride(0), *strides, positions.stride(0), block_size,
            block_tables.shape[1], TABLE_POSITIONS=table, num_warps=1,
        )
    return slots, positions


def table_slots(block_tables: torch.Tensor, block_size: int, index: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
    """Cache indices index [bs, N] of rows with block_tables [bs, max_blocks] -> their KV slots
    [bs, N] int64; -1 (no write) where not `valid` [bs, N] or outside the table. Plain torch: the
    reference's slot math, and the engine's for steps of several tokens a row (speculation)."""
    limit = block_tables.shape[1] * block_size
    block = block_tables.gather(1, (index.clamp(0, limit - 1) // block_size)).long()
    return torch.where(valid & (index >= 0) & (index < limit), block * block_size + index % block_size, -1)


def decode_inputs_ref(context_lens: torch.Tensor, active: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                      rope_deltas: torch.Tensor, decode_positions: torch.Tensor | None = None,
                      prompt_lens: torch.Tensor | None = None,
                      decode_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `decode_inputs_` (context_lens also advanced in place); positions may
    be a broadcast or transposed view."""
    _check(context_lens, active, block_tables, rope_deltas, decode_positions, prompt_lens, decode_lens)
    bs = context_lens.shape[0]
    context_lens += active.int()
    pos = (context_lens - 1).long()  # cache index of the token fed in this step
    slots = table_slots(block_tables, block_size, pos[:, None], active[:, None])[:, 0]
    if decode_positions is None:
        positions = (pos + rope_deltas).expand(3, bs)
    else:  # the column of the generated token fed, clamped to the row's table
        column = torch.minimum((pos - prompt_lens).clamp(min=0), decode_lens - 1)
        positions = decode_positions.gather(2, column.view(bs, 1, 1).expand(bs, 3, 1))[:, :, 0].T
    return slots, positions


@triton.jit
def _prefill_slots_kernel(cu_ptr, starts_ptr, tables_ptr, slots_ptr, num_tokens, num_chunks, search_steps,
                          stride_table, block_size, max_blocks, BLOCK: tl.constexpr):
    # grid (cdiv(T, BLOCK),): tokens t of the program; chunk c with cu[c] <= t < cu[c + 1]
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = t < num_tokens
    lo = tl.zeros([BLOCK], tl.int32)  # cu[lo] <= t throughout
    hi = lo + num_chunks - 1  # the chunk is at most hi
    for _ in range(search_steps):  # ceil(log2(num_chunks)) halvings
        mid = (lo + hi + 1) // 2
        right = tl.load(cu_ptr + mid, mask=valid, other=0) <= t
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    index = (tl.load(starts_ptr + lo, mask=valid, other=0) + t - tl.load(cu_ptr + lo, mask=valid, other=0)).to(tl.int64)
    inside = valid & (index >= 0) & (index < max_blocks * block_size)
    block = tl.load(tables_ptr + lo.to(tl.int64) * stride_table + index // block_size, mask=inside, other=0)
    tl.store(slots_ptr + t, tl.where(inside, block.to(tl.int64) * block_size + index % block_size, -1), mask=valid)


def _check_prefill(cu_seqlens: torch.Tensor, starts: torch.Tensor, block_tables: torch.Tensor,
                   num_tokens: int) -> None:
    n = starts.shape[0]
    for name, t, shape in (("cu_seqlens", cu_seqlens, (n + 1,)), ("starts", starts, (n,)),
                           ("block_tables", block_tables, (n, block_tables.shape[-1]))):
        if t.shape != shape or t.dtype != torch.int32 or t.device != starts.device or t.stride(-1) != 1:
            raise ValueError(f"{name} must be a contiguous {list(shape)} int32 tensor on {starts.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if n < 1 or num_tokens < 1:
        raise ValueError(f"a prefill needs a chunk and a token, got {n} chunks and {num_tokens} tokens")


def prefill_slots(cu_seqlens: torch.Tensor, starts: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                  num_tokens: int) -> torch.Tensor:
    """The KV slots of a step's prefill tokens [num_tokens] int64: chunk i (cu_seqlens [n + 1]
    int32, num_tokens = cu_seqlens[-1], each chunk at least one token) holds cache indices
    starts[i] .. of its sequence, whose block table is block_tables [n, max_blocks] int32; -1
    for an index outside the table. One launch, no host sync."""
    _check_prefill(cu_seqlens, starts, block_tables, num_tokens)
    slots = torch.empty(num_tokens, dtype=torch.int64, device=starts.device)
    n, block = starts.shape[0], 128
    _prefill_slots_kernel[(triton.cdiv(num_tokens, block),)](
        cu_seqlens, starts, block_tables, slots, num_tokens, n, (n - 1).bit_length(), block_tables.stride(0),
        block_size, block_tables.shape[1], BLOCK=block, num_warps=4,
    )
    return slots


def prefill_slots_ref(cu_seqlens: torch.Tensor, starts: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                      num_tokens: int) -> torch.Tensor:
    """Plain-torch twin of `prefill_slots` (a handful of ops over the step's tokens)."""
    _check_prefill(cu_seqlens, starts, block_tables, num_tokens)
    cu, device = cu_seqlens.long(), starts.device
    chunk = torch.repeat_interleave(torch.arange(starts.shape[0], device=device), cu[1:] - cu[:-1],
                                    output_size=num_tokens)  # [T]
    index = starts.long()[chunk] + torch.arange(num_tokens, device=device) - cu[chunk]
    limit = block_tables.shape[1] * block_size
    block = block_tables[chunk, index.clamp(0, limit - 1) // block_size].long()
    return torch.where((index >= 0) & (index < limit), block * block_size + index % block_size, -1)
