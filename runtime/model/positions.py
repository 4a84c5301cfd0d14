"""Position ids: 3D M-RoPE positions of a prompt and 2D vision patch positions.

Both are computed on the host from token ids and image grids: they are tiny, and computing them
once per request keeps the device step free of data-dependent control flow.
"""
from __future__ import annotations

import torch


def mrope_positions(
    input_ids: list[int], image_grid_thw: list[tuple[int, int, int]], image_token_id: int, spatial_merge_size: int
) -> tuple[torch.Tensor, int]:
    """-> (positions [3, T] int64 with rows (t, h, w), rope_delta).

    Text runs advance all three rows together; an image run of grid (t, h, w) lays its tokens
    on the merged grid (t, h/m, w/m) offset by the running position, after which the position
    advances by max(h, w)/m. rope_delta = max position + 1 - T; a token appended at cache index p
    (decode, or generated text re-prefilled after preemption) gets position p + rope_delta.
    """
    rows: list[torch.Tensor] = []
    grids = iter(image_grid_thw)
    cur, i, n = 0, 0, len(input_ids)
    while i < n:
        j = i
        is_image = input_ids[i] == image_token_id
        while j < n and (input_ids[j] == image_token_id) == is_image:
            j += 1
        if not is_image:
            rows.append(torch.arange(cur, cur + j - i).expand(3, -1))
            cur += j - i
        else:
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("more image token runs in the prompt than image grids") from None
            gt, gh, gw = t, h // spatial_merge_size, w // spatial_merge_size
            if gt * gh * gw != j - i:
                raise ValueError(f"image token run of {j - i} tokens does not match grid {(t, h, w)}")
            tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            rows.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cur)
            cur += max(gh, gw)
        i = j
    if next(grids, None) is not None:
        raise ValueError("more image grids than image token runs in the prompt")
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    rope_delta = int(positions.max()) + 1 - n if n else 0
    return positions, rope_delta


def vision_positions(image_grid_thw: list[tuple[int, int, int]], spatial_merge_size: int) -> torch.Tensor:
    """-> [S, 2] int64 (row, col) of every patch, in the merge-block-major order of pixel_values.

    Sequence order within a frame is (block_row, block_col, in_row, in_col); positions restart at
    (0, 0) for every image and repeat for every temporal frame.
    """
    m = spatial_merge_size
    out = []
    for t, h, w in image_grid_thw:
        br, bc, ir, ic = torch.meshgrid(
            torch.arange(h // m), torch.arange(w // m), torch.arange(m), torch.arange(m), indexing="ij"
        )
        frame = torch.stack([(br * m + ir).flatten(), (bc * m + ic).flatten()], dim=1)
        out.append(frame.repeat(t, 1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def vision_cu_seqlens(image_grid_thw: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """-> (cu_seqlens [frames+1] int32, max_seqlen): attention never crosses images or frames."""
    lengths = [h * w for t, h, w in image_grid_thw for _ in range(t)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return cu, max(lengths, default=0)


def glm_image_positions(input_ids: list[int], image_grid_thw: list[tuple[int, int, int]], image_start_id: int,
                        image_end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-Image's 3D positions -> (prompt [3, P], decode [3, L]) int64.

    image_grid_thw: the condition images' grids, then the grids to generate (text-to-image: the
    full grid, then the preview grid; image-to-image: the full grid). In the prompt, the codes of
    a condition image sit between image_start and image_end; they lie on its (t, h, w) grid offset
    by the running position, which then advances by max(h, w); every other token advances it by
    one. Generation runs the target grids last to first (the preview before the full image): row
    i, column j of a grid of shape (h, w) is at (p, p + i, p + j), then p advances by max(h, w);
    one last entry (p, p, p) follows for the end token. Generated token j is at decode[:, j]
    (past the end: the last entry), whatever the prompt's length.
    """
    n = len(input_ids)
    ends = [i for i, t in enumerate(input_ids) if t == image_end_id]
    starts = [i + 1 for i, t in enumerate(input_ids) if t == image_start_id]
    num_sources = len(ends)
    if num_sources > len(image_grid_thw) - 1:
        raise ValueError(f"the prompt holds {num_sources} condition images but only {len(image_grid_thw)} grids "
                         "(sources, then at least one target)")
    rows: list[torch.Tensor] = []
    cur = prev_end = 0
    for (start, end), (t, h, w) in zip(zip(starts, ends), image_grid_thw):
        if end - start != t * h * w:
            raise ValueError(f"condition image of grid {(t, h, w)} has {end - start} tokens between its start and "
                             f"end tokens, expected {t * h * w}")
        rows.append(torch.arange(cur, cur + start - prev_end).expand(3, -1))
        cur += start - prev_end
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cur)
        cur += max(h, w)
        prev_end = end
    rows.append(torch.arange(cur, cur + n - prev_end).expand(3, -1))
    cur += n - prev_end
    decode: list[torch.Tensor] = []
    for t, h, w in reversed(image_grid_thw[num_sources:]):
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        decode.append(torch.stack([torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()]) + cur)
        cur += max(h, w)
    decode.append(torch.full((3, 1), cur))
    return torch.cat(rows, dim=1), torch.cat(decode, dim=1)
