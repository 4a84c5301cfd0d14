"""Runs scheduled steps on the device: the paged KV cache, the device-resident batch, the image
embedding cache, CUDA-graph decode, and the sampler.

A decode step reads everything it needs from device tensors that persist across steps
(`DeviceBatch`): the block tables (updated by one new block id when a sequence crosses a block
boundary), context lengths and positions (advanced on the device), the previous step's sampled
tokens (fed straight back as inputs) and the sampling state. The host uploads only what changes:
a new request's row at admission, new block ids, row moves when a request leaves. Steps are
launched without waiting; each returns a `StepHandle` whose tokens are copied to pinned host
memory asynchronously and read when the engine gets to them. A step in which a request asks for
log-probabilities computes them from the raw logits it sampled from, in one place
(`ModelRunner.logprobs_of`), and they travel back with the tokens; other steps never compute them.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from glmrt.kernels.admission import BatchRows, Column, float32_bits
from glmrt.kernels.decode_inputs import table_slots

from ..model.glm_ocr import GlmOcrModel
from ..model.ops import TorchOps
from ..model.text import AttentionMetadata
from ..model.transfer import spanned, upload, upload_arrays, upload_cat
from .graphs import DecodeGraphs, batch_buckets
from .sampler import Sampler, SamplingState
from .scheduler import PrefillChunk, ScheduledStep
from .sequence import Sequence
from .spec_decode import SpeculativeDecoder


def allocate_kv_cache(model: GlmOcrModel, num_blocks: int, block_size: int,
                      num_layers: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) caches [num_blocks, block_size, Hkv, D] for num_layers layers (default: the decoder's)."""
    c = model.config.text
    shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
    return [
        (torch.zeros(shape, dtype=model.dtype, device=model.device), torch.zeros(shape, dtype=model.dtype, device=model.device))
        for _ in range(c.num_layers if num_layers is None else num_layers)
    ]


def kv_bytes_per_token(model: GlmOcrModel) -> int:
    """Cache bytes per token: the decoder's layers, plus the MTP layer's when it is loaded."""
    c = model.config.text
    layers = c.num_layers + (model.mtp is not None)
    return 2 * layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize


class DeviceBatch:
    """Per-row decode state on the device. Row i belongs to the scheduler's running[i]; rows
    past the running count are inactive (context length 0, no KV write, output ignored)."""

    def __init__(self, ops: TorchOps, max_rows: int, max_blocks: int, block_size: int, vocab_size: int,
                 device: torch.device, num_speculative_tokens: int = 0, hidden_size: int = 0,
                 dtype: torch.dtype = torch.float32, max_decode_positions: int = 0):
        self.ops = ops  # the model's backend: builds each decode step's inputs (decode_inputs)
        self.device = device
        self.block_size = block_size
        self.block_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)  # incl. the step's token
        self.active = torch.zeros(max_rows, dtype=torch.bool, device=device)
        self.rope_deltas = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(max_rows, dtype=torch.int64, device=device)  # last sampled token
        self.sampling = SamplingState(max_rows, vocab_size, device)
        # Structured-output bitmasks of the step being sampled [R, k + 1, W] (a decode step reads
        # position 0, a verify step all k + 1; all ones for a row without a constraint), which
        # every decode step's sampling applies; uploaded for every step that has a constrained
        # row and reset to all ones after it (`set_token_masks`), so never moved with rows.
        self.token_masks = torch.full((max_rows, num_speculative_tokens + 1, (vocab_size + 31) // 32), -1,
                                      dtype=torch.int32, device=device)
        self._masked_rows = 0  # rows [0, n) of token_masks may hold a constraint's bits
        self._row_tensors = [self.block_tables, self.context_lens, self.active, self.rope_deltas, self.next_tokens,
                             *self.sampling.row_tensors]
        self.decode_positions = None
        if max_decode_positions:
            # GLM-Image: each row's precomputed decode positions [3, L] (Sequence.decode_positions),
            # with its prompt length and L to index them on the device.
            self.decode_positions = torch.zeros(max_rows, 3, max_decode_positions, dtype=torch.int64, device=device)
            self.prompt_lens = torch.zeros(max_rows, dtype=torch.int64, device=device)
            self.decode_lens = torch.ones(max_rows, dtype=torch.int64, device=device)
            self._row_tensors += [self.decode_positions, self.prompt_lens, self.decode_lens]
        self.drafts = self.draft_lens = None
        if num_speculative_tokens:
            # The host's drafts of a speculative step [R, k] and how many of each row's are
            # proposed [R] (-1: the MTP layer's k). A row keeps its admission default (-1 for a
            # request that drafts with the MTP layer, else 0) until the host uploads drafts, which
            # it does, for every row, whenever a row drafts on the host.
            self.drafts = torch.zeros(max_rows, num_speculative_tokens, dtype=torch.int64, device=device)
            self.draft_lens = torch.zeros(max_rows, dtype=torch.int64, device=device)
            self._row_tensors += [self.drafts, self.draft_lens]
            # The drafts the step's verify checks [R, k] and how many [R] (SpeculativeDecoder.
            # propose_drafts: the host's, or the MTP layer's k); written every speculative step.
            self.verify_drafts = torch.zeros(max_rows, num_speculative_tokens, dtype=torch.int64, device=device)
            self.verify_lens = torch.zeros(max_rows, dtype=torch.int64, device=device)
            # What the MTP layer's next catch-up needs of the last step (see spec_decode.py): its
            # target hidden states [R, k+1, H], the target's tokens after them, and how many of
            # the rows were accepted drafts (rows 0..carry_accepted are valid).
            q = num_speculative_tokens + 1
            self.carry_hidden = torch.zeros(max_rows, q, hidden_size, dtype=dtype, device=device)
            self.carry_tokens = torch.zeros(max_rows, q, dtype=torch.int64, device=device)
            self.carry_accepted = torch.zeros(max_rows, dtype=torch.int64, device=device)
            self._row_tensors += [self.carry_hidden, self.carry_tokens, self.carry_accepted]
        st = self.sampling
        self.rows = BatchRows(self.block_tables, self.context_lens, self.active, self.rope_deltas, st.top_k, st.seeds,
                              st.counters, st.temperature, st.top_p, st.penalty, st.presence, self.draft_lens)

    def move_row(self, src: int, dst: int) -> None:
        for t in self._row_tensors:
            t[dst] = t[src]

    def clear_row(self, row: int) -> None:
        self.context_lens[row] = 0
        self.active[row] = False

    def admission(self, chunks: list[PrefillChunk], cu: list[int]) -> list[np.ndarray]:
        """The host part of admitting the sequences whose last chunk is among a prefill step's
        `chunks` (those that sample; chunk i fed the step's ids [cu[i], cu[i + 1])) -> [their int64
        rows [n, len(Column)], history]: history (int64 [H]) holds each admitted sequence's ids
        before its chunk, for a chunk that starts after a cached or earlier-computed part. The step
        uploads them with its other inputs, and `admit` writes the rows from the upload."""
        vocab, rows, floats, history, history_len = self.sampling.presence.shape[1], [], [], [], 0
        for i, c in enumerate(chunks):
            if not c.samples:
                continue
            s, p = c.seq, c.seq.sampling_params
            rows.append((s.num_tokens, s.rope_delta, min(p.top_k, vocab), s.seed, len(s.output_token_ids),
                         -1 if s.drafter is not None and s.drafter.mtp else 0, i, cu[i], cu[i + 1] - cu[i],
                         history_len, c.start))
            floats.append((0.0 if p.greedy else p.temperature, p.top_p, p.repetition_penalty))
            if c.start:
                history.append(s.input_array(0, c.start)[0])
                history_len += c.start
        admitted = np.empty((len(rows), len(Column)), dtype=np.int64)
        admitted[:, : Column.TEMPERATURE] = rows
        admitted[:, Column.TEMPERATURE:] = float32_bits(floats)
        return [admitted, np.concatenate(history) if history else np.empty(0, dtype=np.int64)]

    def admit(self, seqs: list[Sequence], first_row: int, admitted: torch.Tensor, history: torch.Tensor,
              tables: torch.Tensor, ids: torch.Tensor, image_ids: list[torch.Tensor | None] | None = None) -> None:
        """Write the rows of the admitted sequences `seqs` (in order, rows first_row on) in one
        backend op (glmrt.kernels.admission), from their uploaded `admission` arrays and the step's
        own uploads: its block tables and prefill ids, which hold their chunks' tables and ids.
        After their prefill a row's context holds every known token. image_ids: per admitted
        sequence, the device ids its host prompt does not hold yet (GLM-Image's codes, see
        ModelRunner.fill_prompts), or None."""
        self.ops.admit_rows(self.rows, first_row, admitted, tables, ids, history)
        if self.decode_positions is not None:
            for i, s in enumerate(seqs):
                table = s.decode_positions
                self.decode_positions[first_row + i, :, : table.shape[1]] = upload(table, self.device)
            lens = upload([[s.num_prompt_tokens, s.decode_positions.shape[1]] for s in seqs], self.device, torch.int64)
            self.prompt_lens[first_row: first_row + len(seqs)], self.decode_lens[first_row: first_row + len(seqs)] = \
                lens[:, 0], lens[:, 1]
        for row, device_ids in enumerate(image_ids or ()):
            if device_ids is not None:  # codes are in the output vocabulary (the config checks)
                self.sampling.presence[first_row + row, device_ids] = True

    def set_blocks(self, new_blocks: list[tuple[int, int, int]] | torch.Tensor) -> None:
        """(row, table index, block id) for each sequence that crossed into a new block: a host
        list, or those triples as an int64 [n, 3] tensor already on the device (uploaded with a
        step's other inputs)."""
        if len(new_blocks):
            index = new_blocks if isinstance(new_blocks, torch.Tensor) else upload(new_blocks, self.device, torch.int64)
            self.block_tables[index[:, 0], index[:, 1]] = index[:, 2].int()

    def set_drafts(self, drafts: list[list[int] | None]) -> None:
        """Upload the host's drafts of rows [0, len(drafts)): a row's list (up to k tokens), or
        None to take the MTP layer's."""
        k = self.drafts.shape[1]
        host = upload([(d or []) + [0] * (k - len(d or [])) + [-1 if d is None else len(d)] for d in drafts],
                      self.device, torch.int64)
        self.drafts[: len(drafts)] = host[:, :k]
        self.draft_lens[: len(drafts)] = host[:, k]

    def set_token_masks(self, first_row: int, masks: torch.Tensor | None) -> None:
        """Upload host bitmasks (pinned on CUDA) for rows [first_row, first_row + N): [N, W] for
        the step's one token per row, or [N, k + 1, W] for a verify step's positions. None: the
        step has no constrained row, so rows a previous step masked are set back to all ones."""
        if masks is None:
            if self._masked_rows:
                self.token_masks[: self._masked_rows] = -1
                self._masked_rows = 0
            return
        # Rows outside the upload are not sampled under these masks (a decode step's past its
        # rows are inactive), so they need no reset now.
        rows = self.token_masks[first_row: first_row + masks.shape[0]]
        (rows if masks.dim() == 3 else rows[:, 0]).copy_(masks, non_blocking=masks.is_pinned())
        self._masked_rows = max(self._masked_rows, first_row + masks.shape[0])

    def verify_drafts_host(self, rows: int) -> list[list[int]]:
        """The drafts the launched verify step checks, of rows [0, rows): copied to host memory
        behind the step's drafts, then waited for (on an event, like a step's tokens)."""
        on_cuda = self.device.type == "cuda"
        drafts, lens = _to_host(self.verify_drafts[:rows], on_cuda), _to_host(self.verify_lens[:rows], on_cuda)
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
            event.synchronize()
        return [d[:n] for d, n in zip(drafts.tolist(), lens.tolist())]

    def slots(self, bs: int, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Cache indices [bs, N] of rows [0, bs) -> their slots [bs, N] through the block tables;
        -1 (no write) where not `valid` or outside the table."""
        return table_slots(self.block_tables[:bs], self.block_size, index, valid)

    def decode_inputs(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Advance rows [0, bs) by one token on the device -> (input ids, positions, attention):
        one backend op (on Triton one launch) from the rows' state."""
        context = self.context_lens[:bs]
        table = self.decode_positions is not None  # GLM-Image: positions from each row's table
        slots, positions = self.ops.decode_inputs(
            context, self.active[:bs], self.block_tables[:bs], self.block_size, self.rope_deltas[:bs],
            *((self.decode_positions[:bs], self.prompt_lens[:bs], self.decode_lens[:bs]) if table else ()))
        attn = AttentionMetadata(slot_mapping=slots, block_tables=self.block_tables[:bs], context_lens=context)
        return self.next_tokens[:bs], positions, attn


# What makes a step's structured-output bitmasks, called once its forward is launched
# (ModelRunner.launch): with None, or for a speculative step with a function that reads the
# drafts its verify checks (each row's list; it waits for them) -> [rows, W] or, speculative,
# [rows, k + 1, W] host bitmasks (pinned on CUDA), or None when no row is constrained.
Masks = Callable[[Callable[[], list[list[int]]] | None], torch.Tensor | None]


def _no_masks(read_drafts: Callable[[], list[list[int]]] | None) -> None:
    return None


class PrefillInputError(Exception):
    """A step's prefill failed on its requests' inputs (images, prompts) before anything ran on
    the device; the exception it wraps is its __cause__."""


def _to_host(t: torch.Tensor, on_cuda: bool) -> torch.Tensor:
    """An asynchronous copy of `t` in (pinned, on CUDA) host memory."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=on_cuda)
    host.copy_(t, non_blocking=on_cuda)
    return host


class StepHandle:
    """A launched step: its sequences (row order at launch) and their sampled tokens, copied to
    host memory asynchronously: [B] (one each) or, from a speculative step, [B, k + 2] (the count
    of new tokens, then the tokens; see Sampler.verify); with them, when a row asked for them, the
    step's log-probabilities (`ModelRunner.logprobs_of`'s tensors: one row per token row, B or
    B * (k + 1))."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, reserved: list[int] | None = None,
                 logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        self.seqs = seqs
        # Cache slots the scheduler reserved for each sequence's new tokens: a decode row's step
        # reserves k + 1 with speculation; a sequence sampling its first token after its prefill, 1.
        # None: one each, every one of which its token fills (nothing is given back).
        self.reserved = reserved
        self.speculative = tokens.dim() == 2
        self.proposals: list[tuple[int, str]] = []  # speculative: each row's (drafts proposed, their source)
        # (sequence, host ids) to write into prompts once the step is read (ModelRunner.fill_prompts)
        self.prompt_fills: list[tuple[Sequence, torch.Tensor]] = []
        on_cuda = tokens.device.type == "cuda"
        self._host = _to_host(tokens, on_cuda)
        self._host_logprobs = None if logprobs is None else [_to_host(t, on_cuda) for t in logprobs]
        self._event = None
        if on_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def tokens(self) -> list[list[int]]:
        """-> each sequence's new tokens (waits for the step)."""
        if self._event is not None:
            self._event.synchronize()
        rows = self._host.tolist()
        if self._host.dim() == 1:
            return [[t] for t in rows]
        return [row[1: 1 + row[0]] for row in rows]

    @property
    def has_logprobs(self) -> bool:
        return self._host_logprobs is not None

    def logprobs(self, tokens: list[list[int]]) -> list[list[dict[int, float]] | None]:
        """`tokens()`'s new tokens (read first: it waits for the step) -> for each sequence that asked
        for log-probabilities, one entry per new token: {id: log-probability} of the N most likely
        ids, most likely first (N its own SamplingParams.logprobs), then of the token itself unless
        it is one of them; None for the others."""
        token_logprobs, top_ids, top_logprobs = (t.tolist() for t in self._host_logprobs)
        per_seq = self._host.shape[1] - 1 if self.speculative else 1  # token rows per sequence
        entries = []
        for i, (seq, new) in enumerate(zip(self.seqs, tokens)):
            n = seq.sampling_params.logprobs
            if n is None:
                entries.append(None)
                continue
            rows = range(i * per_seq, i * per_seq + len(new))
            step_entries = []
            for token, r in zip(new, rows):
                entry = dict(zip(top_ids[r][:n], top_logprobs[r][:n]))
                entry.setdefault(token, token_logprobs[r])
                step_entries.append(entry)
            entries.append(step_entries)
        return entries


@dataclass
class PrefillInputs:
    """The prefill part of a step on the device: its chunks' tokens, in order (`_prefill_inputs`)."""

    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64
    slots: torch.Tensor  # [T] KV slots
    image_embeds: torch.Tensor | None  # the <|image|> slots' embeddings (GLM-Image: codes), in order
    image_mask: torch.Tensor | None  # [T] bool, the image slots; None when the step has none
    last: torch.Tensor  # rows of the step's forward to sample: its decode rows, then sampling chunks' last tokens
    cu: list[int]  # host: chunk i's tokens are [cu[i], cu[i + 1])
    tables: torch.Tensor  # [chunks, W] int32: the chunks' block tables
    attention: dict  # AttentionMetadata fields of the prefill part
    new_blocks: torch.Tensor  # [n, 3] int64: the decode rows' (row, table index, block id) to set
    admission: tuple[torch.Tensor, torch.Tensor] | None  # DeviceBatch.admission's arrays, when a chunk samples


class ModelRunner:
    def __init__(self, model: GlmOcrModel, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_blocks_per_seq: int, normalize_pixels: Callable[[torch.Tensor], torch.Tensor],
                 use_graphs: bool = False, num_speculative_tokens: int = 0, max_decode_positions: int = 0):
        self.model = model
        self.normalize_pixels = normalize_pixels  # uint8 patch pixels -> float32 pixel values, on the device
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(model, num_blocks, block_size)
        c = model.config.text
        self.batch = DeviceBatch(model.ops, max_num_seqs, max_blocks_per_seq, block_size, c.output_vocab_size,
                                 model.device, num_speculative_tokens, c.hidden_size, model.dtype, max_decode_positions)
        self.sampler = Sampler(model.ops, self.batch.sampling)
        self.spec = None
        if num_speculative_tokens:
            mtp_cache = allocate_kv_cache(model, num_blocks, block_size, num_layers=1)[0] if model.mtp else None
            self.spec = SpeculativeDecoder(model, self.batch, self.sampler, self.kv_caches, mtp_cache,
                                           num_speculative_tokens)
        # The MTP layer is loaded: it follows every step (prefill, catch-up, carry) to draft.
        self.has_mtp = self.spec is not None and self.spec.mtp is not None
        self.image_cache: dict[str, torch.Tensor] = {}  # request id -> image embeddings, kept for recompute
        # (sequence, its prompt's image ids in host memory) of encoded images not yet in a step's
        # handle: the next handle made takes them (`fill_prompts`).
        self._prompt_fills: list[tuple[Sequence, torch.Tensor]] = []
        self.buckets = batch_buckets(max_num_seqs)
        # Device memory the graphs keep (their pool, the static outputs; the engine's KV-cache
        # budget leaves room for it, measured on a trial runner); None without graphs.
        self.graph_memory_bytes: int | None = None
        self.graphs = None
        if use_graphs:
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(model.device)
            self.graphs = self._capture_graphs()
            torch.cuda.empty_cache()  # blocks the warm-up runs freed
            self.graph_memory_bytes = torch.cuda.memory_reserved(model.device) - reserved

    def _capture_graphs(self) -> DecodeGraphs:
        """Per bucket, the two halves of a decode step, which the host's work on the previous
        step's tokens (and the token masks they lead to) goes between: the forward to the logits,
        and the sampling under the token masks, greedy-only and sampled. With speculation, the
        halves of a speculative step: the drafts, and the verify under the masks of its k + 1
        positions. Each forward's raw logits are a static output, which `logprobs_of` reads after
        the replay, for the steps that ask for log-probabilities."""
        graphs = DecodeGraphs()
        for bs in reversed(self.buckets):  # largest first, so later captures fit in its pool
            graphs.capture(("forward", bs), lambda: self.decode_logits(bs))
            logits = graphs.outputs["forward", bs]
            for do_sample in (True, False):
                graphs.capture(("sample", bs, do_sample), lambda: self.sample_rows(logits, bs, do_sample))
            if self.spec is not None:
                graphs.capture(("propose", bs), lambda: self.spec.propose_drafts(bs))
                for do_sample in (True, False):
                    graphs.capture(("verify", bs, do_sample), lambda: self.spec.verify_step(bs, do_sample))
        return graphs

    def release(self, seq: Sequence) -> None:
        self.image_cache.pop(seq.request_id, None)

    def _encode_prompt_images(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor] | None:
        """One packed vision pass over the images of `seqs` not yet encoded; pixels travel as uint8
        (through pinned memory on CUDA) and are normalized on the device. What the model makes of
        them (GLM-OCR: embeddings for the <|image|> slots; GLM-Image: the codes that replace them)
        is cached here for the sequence's chunks and recomputes. Where they are token ids of the
        prompt (GLM-Image), they are also copied to host memory behind the step, for the host
        prompt to get them when the step is read (`fill_prompts`): nothing here waits.
        -> (the sequences encoded, the model's output for them, theirs one after another), or None."""
        todo = [s for s in seqs if s.pixel_values is not None]
        if not todo:
            return None
        pixels = self.normalize_pixels(upload_cat([s.pixel_values for s in todo], self.model.device))
        encoded = self.model.encode_images(pixels, [g for s in todo for g in s.image_grid_thw])
        images = self.model.prompt_images(todo, encoded)
        self.image_cache.update(images)
        for s in todo:
            s.pixel_values = None
            ids = self.model.prompt_image_ids(images[s.request_id])
            if ids is not None:
                self._prompt_fills.append((s, _to_host(ids, ids.device.type == "cuda")))
        return todo, encoded

    def fill_prompts(self, handle: StepHandle) -> None:
        """A read step's (its tokens() returned) image codes into their host prompts, in place of
        the <|image|> placeholders; the cache entry goes, as the prompt now holds the ids."""
        for seq, ids in handle.prompt_fills:
            seq.fill_placeholders(self.model.config.image_token_id, ids.tolist())
            self.image_cache.pop(seq.request_id, None)

    def _image_embeds(self, chunks: list[PrefillChunk], encoded: tuple[list[Sequence], torch.Tensor] | None
                      ) -> torch.Tensor | None:
        """The image embeddings of the chunks' <|image|> slots, in order -> [slots, hidden] (None
        when they have none). encoded: what the step's own vision pass made (_encode_prompt_images)."""
        if encoded is not None and len(encoded[0]) == len(chunks) and all(
                c.start == 0 and c.end >= len(c.seq.prompt_token_ids) for c in chunks):
            return encoded[1]  # whole prompts, every one encoded now: the model's output is the step's
        image_id = self.model.config.image_token_id
        parts = []
        for c in chunks:
            embeds = self.image_cache.get(c.seq.request_id)
            if embeds is None:
                continue
            ids = c.seq.prompt_token_ids
            if c.start == 0 and c.end >= len(ids):
                parts.append(embeds)
            else:  # the slots before the chunk were filled by earlier chunks
                first = ids[: c.start].count(image_id)
                parts.append(embeds[first: first + ids[c.start: c.end].count(image_id)])
        parts = [p for p in parts if p.shape[0]]
        if not parts:
            return None
        whole = spanned(parts)  # whole prompts encoded together, in order: the encoder's output as it is
        return whole if whole is not None else torch.cat(parts)

    def _prefill_inputs(self, step: ScheduledStep) -> PrefillInputs:
        """Host work and the vision pass of a step's chunks, before any device state of the batch
        changes (the step's decode rows come first in its forward). Per token the host only
        concatenates the chunks' ids and positions (made with their Sequences) and looks for image
        slots; the KV slots are made on the device from the chunks' block tables. One upload,
        which also carries the decode rows' new block ids and the admission of the sequences
        whose last chunk this is."""
        chunks, num_decode = step.chunks, len(step.decode)
        image_id = self.model.config.image_token_id
        encoded = self._encode_prompt_images([c.seq for c in chunks])
        lens = [c.end - c.start for c in chunks]
        cu = list(itertools.accumulate(lens, initial=0))
        inputs = [c.seq.input_array(c.start, c.end) for c in chunks]  # [4, len]: ids, then positions
        inputs = np.concatenate(inputs, axis=1) if len(inputs) > 1 else inputs[0]
        image_embeds = self._image_embeds(chunks, encoded)
        image_mask = None  # only a prompt with images has image slots (the input processor checks)
        if any(c.seq.image_grid_thw for c in chunks):
            image_mask = inputs[0] == image_id  # [T]
            for c, offset in zip(chunks, cu):  # only prompt tokens are image slots (a generated <|image|> is text)
                if c.end > c.seq.num_prompt_tokens:
                    image_mask[offset + max(c.seq.num_prompt_tokens - c.start, 0): offset + c.end - c.start] = False
        num_slots = 0 if image_mask is None else int(np.count_nonzero(image_mask))
        num_embeds = 0 if image_embeds is None else image_embeds.shape[0]
        if num_slots != num_embeds:
            raise ValueError(f"{num_slots} <|image|> tokens but {num_embeds} image embeddings")
        sampled = [num_decode + end - 1 for c, end in zip(chunks, cu[1:]) if c.samples]
        last = np.array(list(range(num_decode)) + sampled, dtype=np.int64)  # rows of the forward: decode rows first
        tables = np.zeros((len(chunks), max(len(c.seq.block_table) for c in chunks)), dtype=np.int32)
        for i, c in enumerate(chunks):
            tables[i, : len(c.seq.block_table)] = c.seq.block_table
        spans = np.array([[c.start for c in chunks], [c.end for c in chunks]], dtype=np.int32)  # [2, chunks]
        arrays = [inputs, last, np.array(cu, dtype=np.int32), tables, spans,
                  np.array(step.new_blocks, dtype=np.int64).reshape(-1, 3)]
        if sampled:
            arrays += self.batch.admission(chunks, cu)
        if num_slots:
            arrays.append(image_mask)
        inputs, last, cu_d, tables, spans, new_blocks, *rest = upload_arrays(arrays, self.model.device)
        admission = (rest.pop(0), rest.pop(0)) if sampled else None
        slots = self.model.ops.prefill_slots(cu_d, spans[0], tables, self.block_size, cu[-1])
        # Chunks after a cached prefix attend to it through the cache; batch-invariant ops read
        # every prompt from the cache, so a chunk's attention is reduced as the whole prompt's.
        fields = dict(cu_seqlens=cu_d, max_seqlen=max(lens))
        if self.model.ops.batch_invariant or any(c.start for c in chunks):
            fields.update(prefill_block_tables=tables, prefill_context_lens=spans[1])
        image_mask = rest[0] if num_slots else None
        return PrefillInputs(inputs[0], inputs[1:], slots, image_embeds, image_mask, last, cu, tables, fields,
                             new_blocks, admission)

    @torch.inference_mode()
    def launch(self, step: ScheduledStep, masks: Masks = _no_masks, speculate: bool = False,
               drafts: list[list[int] | None] | None = None) -> StepHandle:
        """Launch a scheduled step, without waiting for the device -> its handle. The one entry for
        every kind of step, each launched in two halves, the forward then the sampling, with
        `masks` called between them (see Masks): the host reads the previous step's tokens while
        the device runs this one's forward, and the sampling then has every row's token mask.
        - with prefill chunks: their tokens in one varlen forward, the decode rows' tokens (a mixed
          step) before them, then one sampled token for each decode row and each sequence whose
          last chunk this is. Everything that can fail for one request's input (its images, its
          prompt) runs first: a PrefillInputError leaves the decode rows untouched;
        - a decode step: one token for every running sequence, two graph replays on CUDA;
        - speculating: 1 to k + 1 tokens per row, the drafts (drafts: the host's, one list per row,
          see DeviceBatch.set_drafts; None keeps each row's admission default) then their verify."""
        if step.chunks:
            forward = self._prefill_forward(step)
            return self._prefill_sample(step, forward, masks(None))
        bs, do_sample = self._start_decode(step), self._do_sample(step)
        if speculate:
            if drafts is not None:
                self.batch.set_drafts(drafts)
            self._run(("propose", bs), lambda: self.spec.propose_drafts(bs))
            rows = len(step.seqs)
            self.batch.set_token_masks(0, masks(lambda: self.batch.verify_drafts_host(rows)))
            tokens, logits = self._run(("verify", bs, do_sample), lambda: self.spec.verify_step(bs, do_sample))
        else:
            logits = self._run(("forward", bs), lambda: self.decode_logits(bs))
            self.batch.set_token_masks(0, masks(None))
            tokens = self._run(("sample", bs, do_sample), lambda: self.sample_rows(logits, bs, do_sample))
        return self._handle(step, tokens[: len(step.seqs)], logits)

    def _run(self, key: tuple, run: Callable[[], object]):
        """The graph captured under `key`, replayed (its static output), or `run` eagerly."""
        return self.graphs.replay(key) if self.graphs is not None else run()

    def _prefill_forward(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, PrefillInputs] | None:
        """A step with chunks, first half: the forward -> (logits [rows sampled, V], their last
        hidden states, the prefill's inputs), or None when no row samples."""
        chunks, nd = step.chunks, len(step.decode)
        try:
            prefill = self._prefill_inputs(step)
        except Exception as exc:
            raise PrefillInputError(exc) from exc
        ids, positions, slots, image_mask = prefill.ids, prefill.positions, prefill.slots, prefill.image_mask
        fields = dict(prefill.attention)
        if nd:
            self.batch.set_blocks(prefill.new_blocks)
            dec_ids, dec_positions, dec = self.batch.decode_inputs(nd)
            ids, positions = torch.cat([dec_ids, ids]), torch.cat([dec_positions, positions], dim=1)
            slots = torch.cat([dec.slot_mapping, slots])
            if image_mask is not None:
                image_mask = torch.cat([torch.zeros(nd, dtype=torch.bool, device=ids.device), image_mask])
            fields.update(block_tables=dec.block_tables, context_lens=dec.context_lens)
        attn = AttentionMetadata(slot_mapping=slots, **fields)
        hidden = self.model.forward(ids, positions, attn, self.kv_caches, prefill.image_embeds, image_mask)
        if self.has_mtp:  # the MTP layer prefills whole prompts, never mixed with decode rows
            assert not nd and all(c.start == 0 and c.samples for c in chunks)
            lens = [end - start for start, end in zip(prefill.cu, prefill.cu[1:])]
            self.spec.prefill(ids, prefill.image_embeds, image_mask, hidden, positions, slots, lens)
        if prefill.last.numel() == 0:
            return None
        last_hidden = hidden[prefill.last]  # [rows sampled, H]
        return self.model.compute_logits(last_hidden), last_hidden, prefill

    def _prefill_sample(self, step: ScheduledStep, forward: tuple[torch.Tensor, torch.Tensor, PrefillInputs] | None,
                        masks: torch.Tensor | None) -> StepHandle:
        """Second half: admit the sequences whose last chunk this is, sample the rows (under the
        host bitmasks [N, W], when given)."""
        if forward is None:
            return self._take_fills(StepHandle([], torch.empty(0, dtype=torch.int64, device=self.model.device)))
        logits, last_hidden, prefill = forward
        sampled, nd = [c for c in step.chunks if c.samples], len(step.decode)
        if sampled:
            cached = [self.image_cache.get(c.seq.request_id) for c in sampled]
            self.batch.admit([c.seq for c in sampled], step.first_row, *prefill.admission, prefill.tables, prefill.ids,
                             [None if c is None else self.model.prompt_image_ids(c) for c in cached])
        rows = slice(0 if nd else step.first_row, step.first_row + len(sampled))
        token_mask = None
        if masks is not None:
            self.batch.set_token_masks(rows.start, masks)
            token_mask = self.batch.token_masks[rows, 0]
        tokens = self.sampler(logits, rows, self._do_sample(step), token_mask)
        self.batch.next_tokens[rows] = tokens
        if self.has_mtp:
            self.spec.carry_prefill(rows, last_hidden, tokens)
        return self._handle(step, tokens, logits)

    def decode_logits(self, bs: int) -> torch.Tensor:
        """The decoder forward of rows [0, bs) on device state only -> [bs, V] logits. With
        speculation on, the MTP layer first catches up on the last step and this step's hidden
        states become the carry (see spec_decode.py)."""
        if self.has_mtp:
            self.spec.catch_up(bs)
        input_ids, positions, attn = self.batch.decode_inputs(bs)
        hidden = self.model.forward(input_ids, positions, attn, self.kv_caches)
        if self.has_mtp:
            self.batch.carry_hidden[:bs, 0] = hidden
        return self.model.compute_logits(hidden)

    def sample_rows(self, logits: torch.Tensor, bs: int, do_sample: bool) -> torch.Tensor:
        """Sample rows [0, bs) under their token masks (all ones where no constraint) -> [bs]
        tokens, which the next step reads as its inputs."""
        tokens = self.sampler(logits, slice(0, bs), do_sample, self.batch.token_masks[:bs, 0])
        self.batch.next_tokens[:bs] = tokens
        if self.has_mtp:
            self.batch.carry_tokens[:bs, 0] = tokens
            self.batch.carry_accepted[:bs] = 0
        return tokens

    def decode_step(self, bs: int, do_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole decode step of rows [0, bs) on device state only, eagerly (both halves, under
        the masks uploaded last) -> ([bs] tokens, the raw [bs, V] logits they were sampled from)."""
        logits = self.decode_logits(bs)
        return self.sample_rows(logits, bs, do_sample), logits

    def _start_decode(self, step: ScheduledStep) -> int:
        """Upload the step's new block ids -> the number of rows it runs: the bucket size (eager
        and graph decode share every kernel's grid, and split-KV choice)."""
        self.batch.set_blocks(step.new_blocks)
        return next(x for x in self.buckets if x >= len(step.decode))

    def logprobs_of(self, logits: torch.Tensor, tokens: torch.Tensor,
                    num_logprobs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one place log-probabilities are computed: every step with a row that asks for them
        (SamplingParams.logprobs; num_logprobs the most any row of the step asks for) calls it once,
        other steps never.

        logits [N, V]: the raw logits the step sampled from (the model's, before the structured-output
        mask, the repetition penalty and temperature), one row per token row of its StepHandle, in
        the order of handle.seqs: a prefill or mixed step's decode rows then its sampling chunks
        (one each); a decode step's first len(seqs) rows
        of its bucket; a speculative step's verify logits [len(seqs) * (k + 1), V], row b * (k + 1)
        + j the target's distribution for sequence b's j-th new token. tokens [N] int64: the token
        sampled at each row (speculative: the verify output's token columns, of which only the
        accepted count per sequence is ever read).
        -> (the tokens' log-probabilities [N] fp32, the top num_logprobs ids [N, num_logprobs] int64,
        most likely first, equal ones by id, and theirs [N, num_logprobs] fp32): log_softmax of the
        logits in fp32, vLLM's raw_logprobs. A stable sort, not topk: which of several equal values
        make the cut, and their order, must not depend on how many rows the step has."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
        return logprobs.gather(1, tokens[:, None])[:, 0], ids[:, :num_logprobs], values[:, :num_logprobs]

    def _handle(self, step: ScheduledStep, tokens: torch.Tensor, logits: torch.Tensor) -> StepHandle:
        """The handle of a step that sampled tokens [len(seqs)] (speculative: [len(seqs), k + 2])
        from the raw logits whose first rows are theirs, with log-probabilities if a row asks."""
        seqs = step.seqs
        reserved = None if step.reserved_tokens == 1 else \
            [step.reserved_tokens] * len(step.decode) + [1] * (len(seqs) - len(step.decode))
        asked = [s.sampling_params.logprobs for s in seqs if s.sampling_params.logprobs is not None]
        logprobs = None
        if asked:
            rows = tokens if tokens.dim() == 1 else tokens[:, 1:]  # [N] or [len(seqs), k + 1]
            logprobs = self.logprobs_of(logits[: rows.numel()], rows.reshape(-1), max(asked))
        return self._take_fills(StepHandle(seqs, tokens, reserved, logprobs))

    def _take_fills(self, handle: StepHandle) -> StepHandle:
        """Give the pending prompt fills to a just-made handle (whose wait covers their copies)."""
        handle.prompt_fills, self._prompt_fills = self._prompt_fills, []
        return handle

    @staticmethod
    def _do_sample(step: ScheduledStep) -> bool:
        return any(not s.sampling_params.greedy for s in step.seqs)
