"""LLMEngine: requests in, outputs out, one scheduler step at a time.

Steps overlap (async_scheduling, on by default): `step()` schedules and launches step N+1, then
reads step N's tokens and does its host work (stop checks, detokenization, outputs) while the
device runs N+1. A token computed for a request that turned out to have finished at step N is
dropped. With async_scheduling=False each step is read back before the next is scheduled; both
give the same tokens. So is it while a running request drafts speculative tokens on the host
(from its reference text or its output so far, drafters.py): its drafts continue the tokens of
the step before.

Failures stay with the requests they concern: a bad request is refused by `prepare` before it is
queued; a request whose own host work fails (its grammar, stop strings, detokenization) or whose
inputs break a prefill (its images) fails alone (finish_reason "error"); a step that fails on the
device with several requests is retried with them split into isolation groups, so only a request
that breaks every step it is in fails; an abort, from any state, frees everything it holds.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..config import load_config
from ..devices import resolve_backend, resolve_device, resolve_dtype
from ..generation_config import GenerationConfig
from ..loader import model_dirs, resolve_model_path
from ..model.ops import make_ops
from ..model.registry import model_class
from ..model.text import AttentionMetadata
from ..model.transfer import pack
from ..outputs import Request, RequestOutput
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .drafters import Drafter
from .inputs import input_processor
from .runner import Masks, ModelRunner, PrefillInputError, StepHandle, allocate_kv_cache, kv_bytes_per_token
from .sampler import Sampler, SamplingState
from .request_state import RequestState
from .scheduler import NEEDS_DRAIN, ScheduledStep, Scheduler
from .sequence import FINISHED, Sequence
from .spec_decode import SpecDecodeStats
from .stats import EngineStats

logger = logging.getLogger(__name__)

# A verify step runs k + 1 query rows for every sequence, so without the MTP layer (whose rows
# always speculate) one runs only when the host's drafts are expected to be accepted for at least
# this many tokens per running sequence; else the step is a plain one.
MIN_DRAFT_GAIN = 0.5
# A verify step writes k + 1 cache slots per sequence; with at most 8 it never crosses more than one
# block boundary (block_size >= 16).
MAX_SPECULATIVE_TOKENS = 8


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    # Tokens (decode tokens, prefill tokens and vision patches) one step may run; default: 8192
    # with chunked prefill, else max_model_len.
    max_num_batched_tokens: int | None = None
    # Split long prefills into chunks and run them in the same steps as the running sequences'
    # decode tokens (off with speculative decoding, whose MTP layer prefills whole prompts).
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # default: min(16384, the model's max positions)
    kv_cache_tokens: int | None = None  # default: max_model_len tokens on CPU, memory-based on GPU
    gpu_memory_utilization: float = 0.9  # share of the GPU memory left after weights + peak activations
    block_size: int = 16
    enforce_eager: bool = False  # no CUDA graphs
    async_scheduling: bool = True  # overlap the host work of step N with step N+1 on the device
    image_backend: str = "torchvision"  # resize like transformers' default image processor, or "pil"
    # Draft tokens verified per decode step (0: off), drafted per request (SamplingParams.draft)
    # from its reference text, n-gram lookup over its output, or the MTP layer.
    num_speculative_tokens: int = 0
    # "mtp": the checkpoint's MTP layer is loaded and drafts where no host source proposes;
    # "ngram": drafts only from reference text and n-gram lookup (no MTP layer, chunked prefill kept).
    speculative_method: str = "mtp"
    speculative_max_batch: int | None = None  # decode steps with more running sequences do not speculate
    max_logprobs: int = 20  # the most SamplingParams.logprobs a request may ask for (vLLM's default)
    # Triton backend: every kernel gives a row the same bits whatever else is in its step (batch
    # size, bucket, speculative queries, chunking); see the README's "Reproducible output".
    batch_invariant: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size", "max_num_batched_tokens", "max_model_len", "kv_cache_tokens"):
            value = getattr(self, name)
            if value is None and name not in ("max_num_seqs", "block_size"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("enforce_eager", "async_scheduling", "enable_chunked_prefill", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an int in [0, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.speculative_method not in ("mtp", "ngram"):
            raise ValueError(f"speculative_method must be 'mtp' or 'ngram', got {self.speculative_method!r}")
        limit = self.speculative_max_batch
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"speculative_max_batch must be an int >= 1 or None, got {limit!r}")
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an int >= 0, got {self.max_logprobs!r}")


class LLMEngine:
    def __init__(self, model: str, *, device=None, dtype=None, backend: str = "auto", **options):
        unknown = set(options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown engine options {sorted(unknown)} (known: {sorted(EngineConfig.__dataclass_fields__)})")
        self.options = EngineConfig(**options)
        # Device bytes the runner keeps beside its KV cache, measured before the cache is sized
        # (_profile_runner_memory); None where nothing was measured (CPU, or kv_cache_tokens given).
        self.runner_memory_bytes: int | None = None
        self.model_path = resolve_model_path(model)
        path, processor_path = model_dirs(self.model_path)
        self.config = load_config(path)
        self.generation_config = GenerationConfig.from_pretrained(path)
        self.inputs = input_processor(self.config, self.generation_config, processor_path, self.options.image_backend)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.backend = resolve_backend(backend, self.device)
        if self.backend == "triton":
            from glmrt.kernels import check_head_dims

            check_head_dims(self.config.text.head_dim, self.config.vision.head_dim)
        text = self.config.text
        self.inputs.check_engine(self.options.num_speculative_tokens)
        self.max_model_len = min(self.options.max_model_len or 16384, text.max_position_embeddings)
        if self.options.kv_cache_tokens is not None and self.options.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"kv_cache_tokens={self.options.kv_cache_tokens} cannot hold one request of max_model_len="
                f"{self.max_model_len} tokens; raise kv_cache_tokens or lower max_model_len"
            )
        k = self.options.num_speculative_tokens
        mtp = k > 0 and self.options.speculative_method == "mtp"
        self.chunked_prefill = self.options.enable_chunked_prefill and not mtp
        self.max_num_batched_tokens = self.options.max_num_batched_tokens or (
            8192 if self.chunked_prefill else self.max_model_len)
        ops = make_ops(self.backend, self.options.batch_invariant)
        self.model = model_class(self.config).from_pretrained(path, self.config, ops, self.device, self.dtype,
                                                              load_mtp=mtp)
        block_size = self.options.block_size
        num_blocks = -(-self._kv_cache_tokens() // block_size)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.runner = self._make_runner(num_blocks)
        self.scheduler = Scheduler(self.block_manager, self.options.max_num_seqs, self.max_num_batched_tokens,
                                   rows=self.runner.batch, tokens_per_step=k + 1,
                                   chunked_prefill=self.chunked_prefill)
        self.spec_stats = SpecDecodeStats(k)
        self._requests: dict[str, RequestState] = {}  # every request queued and not yet finished
        self.structured = self.inputs.constraints(path)
        self._in_flight: StepHandle | None = None
        self._held_releases: list[Sequence] | None = None  # see _launch
        self._ids = itertools.count()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def processor(self):
        """The checkpoint's processor (GLM-OCR's Processor, GLM-Image's GlmImageProcessor)."""
        return self.inputs.processor

    @property
    def generates_images(self) -> bool:
        """GLM-Image's AR stage: requests are ImageRequests, outputs vision-token grids (no text)."""
        return self.inputs.generates_images

    def require_text_model(self, what: str) -> None:
        """Refuse a GLM-Image checkpoint for `what` (a text-generation front end) up front."""
        if self.generates_images:
            raise ValueError(f"{what} runs GLM-OCR text generation, but {self.model_path} is GLM-Image's "
                             "autoregressive stage: use glmrt.LLM(...).generate_image_tokens")

    def _make_runner(self, num_blocks: int) -> ModelRunner:
        """The model runner over a KV cache of num_blocks blocks (with its CUDA graphs on the GPU)."""
        k, block_size = self.options.num_speculative_tokens, self.options.block_size
        use_graphs = self.device.type == "cuda" and self.backend == "triton" and not self.options.enforce_eager
        # Room for the slots the in-flight steps reserve past a sequence's last token (k + 1 each).
        table_tokens = self.max_model_len + 2 * (k + 1)
        return ModelRunner(self.model, num_blocks, block_size, self.options.max_num_seqs,
                           max_blocks_per_seq=-(-table_tokens // block_size), use_graphs=use_graphs,
                           normalize_pixels=self.processor.image_processor.normalize_patches,
                           num_speculative_tokens=k,
                           max_decode_positions=self.inputs.decode_positions_width(self.max_model_len))

    def _kv_cache_tokens(self) -> int:
        if self.options.kv_cache_tokens is not None:
            return self.options.kv_cache_tokens
        if self.device.type != "cuda":
            return self.max_model_len
        # gpu_memory_utilization is the fraction of the memory still free once the weights, the
        # peak activations of the worst step and what the runner keeps beside its KV cache (the
        # batch's state, the CUDA graphs' pool and static outputs) are accounted for that goes to
        # the KV cache.
        peak = self._profile_peak_memory()
        self.runner_memory_bytes = self._profile_runner_memory()
        free, total = torch.cuda.mem_get_info(self.device)
        other = total - free - torch.cuda.memory_reserved(self.device)  # other processes, CUDA context
        budget = int((total - other - peak - self.runner_memory_bytes) * self.options.gpu_memory_utilization)
        tokens = budget // kv_bytes_per_token(self.model)
        if tokens < self.max_model_len:
            raise ValueError(
                f"only {max(tokens, 0)} KV-cache tokens fit in GPU memory at gpu_memory_utilization="
                f"{self.options.gpu_memory_utilization}; need max_model_len={self.max_model_len}"
            )
        return tokens

    def _profile_peak_memory(self) -> int:
        """Peak bytes of the worst step (`run_worst_step`), measured on the GPU."""
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.run_worst_step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        return peak

    def _profile_runner_memory(self) -> int:
        """Device bytes a runner keeps apart from its KV cache (the device batch's state, the CUDA
        graphs' pool and static outputs), measured on the GPU: a trial runner over a one-block
        cache is made, its graphs captured, and released again. Capture binds the graphs to the
        KV cache's addresses, so the runner that serves is made anew once the budget is known."""
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(device)
        runner = self._make_runner(1)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # blocks the warm-up runs freed; the graphs' pool stays theirs
        kept = torch.cuda.memory_reserved(device) - before - kv_bytes_per_token(self.model) * self.options.block_size
        del runner
        gc.collect()  # whatever of it a reference cycle holds: its memory must be free for the cache
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return max(kept, 0)

    @torch.inference_mode()
    def run_worst_step(self) -> None:
        """The largest step the engine can run, on throwaway inputs: a vision pass over the largest
        page (uint8 pixels normalized on the device), a prefill of max_num_batched_tokens tokens
        (no KV written) and the sampled path over logits of max_num_seqs rows (times k + 1 when
        verifying k speculative tokens). On the GPU its peak memory is what the KV-cache budget
        leaves room for."""
        model, device = self.model, self.device
        rows = self.options.max_num_seqs * (self.options.num_speculative_tokens + 1)
        ip = self.processor.image_processor
        patches = ip.max_pixels // (ip.patch_size**2 * ip.temporal_patch_size)
        m = ip.merge_size
        h = max(m, int(patches**0.5) // m * m)
        w = max(m, patches // h // m * m)
        pixels = torch.zeros(h * w, 3 * ip.patch_size**2, dtype=torch.uint8, device=device)
        model.encode_images(ip.normalize_patches(pixels), [(1, h, w)])
        tokens = self.max_num_batched_tokens
        kv = allocate_kv_cache(model, 1, self.options.block_size)
        attn = AttentionMetadata(
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
            cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=device), max_seqlen=tokens,
        )
        positions = torch.arange(tokens, device=device).expand(3, -1)
        hidden = model.forward(torch.zeros(tokens, dtype=torch.int64, device=device), positions, attn, kv)
        logits = model.compute_logits(hidden[:rows])
        state = SamplingState(rows, self.config.text.output_vocab_size, device)
        Sampler(model.ops, state)(logits, slice(0, logits.shape[0]), do_sample=True)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # ------------------------------------------------------------------------------- requests

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request: Request | dict, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request; errors name the problem and leave other requests untouched."""
        return self.enqueue(self.prepare(request, sampling_params, request_id))

    def prepare(self, request: Request | dict, sampling_params: SamplingParams | None = None,
                request_id: str | None = None) -> Sequence:
        """Validate and preprocess a request into a Sequence without touching the scheduler.

        This is the expensive, request-local part (image decoding and patchifying); it holds no
        engine state, so several run at once in worker threads.
        """
        params = self.generation_config.sampling_params() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a glmrt.SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else self.new_request_id()
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if params.logprobs is not None and params.logprobs > self.options.max_logprobs:
            raise ValueError(f"SamplingParams.logprobs = {params.logprobs} is more than this engine's max_logprobs "
                             f"({self.options.max_logprobs})")
        seq = self.inputs.prepare(request, params, request_id, min(self.max_model_len, self.kv_capacity_tokens),
                                  self.max_model_len)
        if self.structured is not None:  # compiled once per constraint, then copied
            seq.grammar = self.structured.matcher(params)
        seq.drafter = self._drafter(params)
        return seq

    def _drafter(self, params: SamplingParams) -> Drafter | None:
        """A request's draft sources (SamplingParams.draft) on this engine; None when it does not speculate."""
        if not self.options.num_speculative_tokens:
            return None
        has_mtp = self.model.mtp is not None
        if params.draft == "mtp" and not has_mtp:
            raise ValueError("SamplingParams.draft='mtp' needs an engine whose speculative_method is 'mtp' "
                             "(this one drafts only from reference text and n-gram lookup)")
        if params.draft == "auto":  # the reference text where given, then the MTP layer or else n-gram lookup
            sources = ("text",) * bool(params.reference_text) + (("mtp",) if has_mtp else ("ngram",))
        else:
            sources = () if params.draft == "off" else (params.draft,)
        reference = None
        if "text" in sources and params.reference_text:
            reference = self.processor.tokenizer.encode(params.reference_text, add_special_tokens=False).ids
        return Drafter(sources, reference)

    def prepare_many(self, requests: list[Request | dict], params: list[SamplingParams]) -> list[Sequence]:
        """`prepare` for several requests at once on a pool of worker threads (image decoding,
        resizing and the C++ patchify release the GIL); raises the first request's error, if any."""
        jobs = [(request, p, self.new_request_id()) for request, p in zip(requests, params, strict=True)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="glmrt-prep")
        seqs = list(self._pool.map(lambda job: self.prepare(*job), jobs))
        self.pack_pixels(seqs)
        return seqs

    def pack_pixels(self, seqs: list[Sequence]) -> None:
        """Put prepared sequences' image pixels in one buffer (pinned on CUDA), in order: a step
        that admits them together (a page's region crops) then takes them without concatenating
        them on the engine's thread, and on CUDA uploads them in one asynchronous copy. Call it
        where they were prepared (prepare_many does)."""
        with_pixels = [s for s in seqs if s.pixel_values is not None]
        for seq, pixels in zip(with_pixels, pack([s.pixel_values for s in with_pixels], self.device.type == "cuda")):
            seq.pixel_values = pixels

    def enqueue(self, seq: Sequence) -> str:
        if seq.request_id in self._requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self._requests[seq.request_id] = RequestState(seq, self.inputs.decoder(seq.sampling_params),
                                                      self.inputs.eos_token_ids)
        self.scheduler.add(seq)
        return seq.request_id

    def generate(self, requests: list[Request | dict], params: list[SamplingParams]) -> list[RequestOutput]:
        """Run the requests to completion, batched; outputs in request order. Images are decoded in
        parallel worker threads. If any request is invalid, the call fails naming it and none of them
        is queued; if the call is interrupted (KeyboardInterrupt), its requests are aborted."""
        return self.run(self.prepare_many(requests, params))

    def run(self, seqs: list[Sequence], on_output: Callable[[RequestOutput], None] | None = None,
            ) -> list[RequestOutput]:
        """Queue prepared sequences and run them to completion (see generate). on_output: called
        with every output as it is read back (e.g. to show progress)."""
        ids = [seq.request_id for seq in seqs]
        finished: dict[str, RequestOutput] = {}
        try:
            for seq in seqs:
                self.enqueue(seq)
            while len(finished) < len(ids):
                for out in self.step():
                    if on_output is not None:
                        on_output(out)
                    if out.finished:
                        finished[out.request_id] = out
        finally:
            for request_id in ids:
                if request_id not in finished:
                    self.abort(request_id)
        return [finished[i] for i in ids]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now, from any state, and free its KV blocks, row and image embeddings;
        -> its final output (finish_reason "abort"), or None if it is unknown or already done."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        state.seq.finish("abort")
        self._release(state.seq)
        return self._output(state, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    def load_constraints(self) -> None:
        """Build llguidance's tokenizer now (it holds the GIL for up to a second), not for the first
        constrained request: a server does this before it takes requests. Any thread."""
        if self.structured is not None:
            self.structured.load()

    def compile_constraint(self, params: SamplingParams) -> None:
        """Compile params' structured-output constraint now, into the cache `prepare` reads; a
        ValueError names the SamplingParams field that does not compile. Any thread: the server
        compiles while it parses a request, under its grammar timeout."""
        if self.structured is not None:
            self.structured.compile(params)

    def stats(self) -> EngineStats:
        """The engine's load now, as an immutable snapshot (see stats.py); call it between steps."""
        scheduler, blocks, spec = self.scheduler, self.block_manager, self.spec_stats
        return EngineStats(
            num_waiting=len(scheduler.waiting),
            num_running=len(scheduler.prefilling) + len(scheduler.running) + len(scheduler.draining),
            kv_cache_usage=1.0 - blocks.num_free_blocks / blocks.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            num_speculative_tokens=spec.num_speculative_tokens, num_drafts=spec.num_drafts,
            num_draft_tokens=spec.num_draft_tokens, num_accepted_tokens=spec.num_accepted_tokens,
            accepted_per_position=tuple(spec.accepted_per_position))

    # ---------------------------------------------------------------------------------- steps

    def step(self) -> list[RequestOutput]:
        """Launch the next step and return the outputs (with deltas) of the sequences whose
        tokens were read back in this call: the previous step's with async_scheduling, else this
        one's (a final_only request's only when it finished)."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and self._drafts_on_host():
            outputs += self._read_in_flight()  # host drafts continue the output, so it must be known
        plan = self.scheduler.schedule()
        if plan == NEEDS_DRAIN:  # preemption needs every in-flight token read first
            outputs += self._read_in_flight()
            plan = self.scheduler.schedule()
        handle = self._launch(plan, outputs) if plan is not None else None
        outputs += self._read_in_flight()
        if handle is not None:
            self._in_flight = handle
            if not self.options.async_scheduling:
                outputs += self._read_in_flight()
        return outputs

    def _drafts_on_host(self) -> bool:
        """Whether a running request may draft from its output so far (the next step needs it read)."""
        if self.runner.spec is None:  # an engine that does not speculate gives no request a drafter
            return False
        limit = self.options.speculative_max_batch
        running = self.scheduler.running
        return (limit is None or len(running) <= limit) and any(
            s.drafter is not None and s.drafter.on_host for s in running)

    def _launch(self, plan: ScheduledStep, outputs: list[RequestOutput]) -> StepHandle | None:
        """Launch the step: its forward, then (in `masks`, called between the forward and the
        sampling) the previous step's tokens read into `outputs` and the token masks of the
        step's constrained rows, which have then seen every token before this step. Requests that
        finish meanwhile keep their rows until the sampling is launched (a row move now would
        reorder the sampling state under the forward's logits)."""
        def masks(read_drafts: Callable[[], list[list[int]]] | None) -> torch.Tensor | None:
            outputs.extend(self._read_in_flight())
            return self._token_masks(plan.seqs, read_drafts)

        outermost = self._held_releases is None  # a failed prefill relaunches the decode rows inside
        if outermost:
            self._held_releases = []
        try:
            limit = self.options.speculative_max_batch
            if plan.chunks or self.runner.spec is None or (limit is not None and len(plan.seqs) > limit):
                return self.runner.launch(plan, masks)
            return self._speculate(plan, masks)
        except Exception as exc:
            if isinstance(exc, PrefillInputError):
                return self._prefill_failed(plan, exc.__cause__, outputs)
            outputs += self._step_failed(plan.decode + plan.prefill_seqs, exc)
            return None
        except BaseException as exc:  # an interrupt: fail the step's requests and propagate
            outputs += self._fail(plan.decode + plan.prefill_seqs, exc)
            raise
        finally:
            if outermost:
                held, self._held_releases = self._held_releases, None
                for seq in held:
                    self._release(seq)

    def _speculate(self, plan: ScheduledStep, masks: Masks) -> StepHandle:
        """A speculative decode step: each row's drafts from its drafter's host sources, else the
        MTP layer's; without the MTP layer, a plain step when no row proposes anything."""
        k, on_host = self.options.num_speculative_tokens, False
        proposals = []  # per row: (source, host drafts, or None for the MTP layer's k)
        for seq in plan.decode:
            drafter = seq.drafter
            if drafter is not None and drafter.on_host and self._in_flight is None:  # read first: see step
                on_host = True
                proposals.append(drafter.propose(seq.output_token_ids, k) or ("mtp", None))
            else:
                proposals.append(("mtp", None) if drafter is not None and drafter.mtp else ("off", []))
        if self.model.mtp is None and self._expected_gain(proposals) < MIN_DRAFT_GAIN * len(plan.decode):
            return self.runner.launch(plan, masks)
        # Rows hold their admission default (MTP or none) until a host-drafting row makes the upload.
        handle = self.runner.launch(plan, masks, speculate=True,
                                    drafts=[drafts for _, drafts in proposals] if on_host else None)
        handle.proposals = [(k if drafts is None else len(drafts), source) for source, drafts in proposals]
        return handle

    def _expected_gain(self, proposals: list[tuple[str, list[int] | None]]) -> float:
        """Draft tokens a verify step of these host proposals is expected to accept, by each
        source's acceptance so far (Laplace-smoothed: 1/2 before any)."""
        gain = 0.0
        for source, drafts in proposals:
            if drafts:
                _, drafted, accepted = self.spec_stats.by_source.get(source, (0, 0, 0))
                gain += len(drafts) * (accepted + 1) / (drafted + 2)
        return gain

    def _prefill_failed(self, plan: ScheduledStep, exc: BaseException, outputs: list[RequestOutput]) -> StepHandle | None:
        """A step's prefill failed while its decode rows (if any) were still untouched: a request
        prefilled alone fails; requests that shared the step are each prefilled again alone, since
        which one broke it is unknown. The decode rows run as a decode step of their own."""
        seqs = plan.prefill_seqs
        if len(seqs) == 1:
            outputs += self._fail(seqs, exc)
        else:
            self.scheduler.retry_alone(seqs)
        return self._launch(dataclasses.replace(plan, chunks=[]), outputs) if plan.decode else None

    def _step_failed(self, seqs: list[Sequence], exc: Exception) -> list[RequestOutput]:
        """A step of `seqs` failed on the device side, where no one request can be blamed: one
        request alone fails; several are recomputed in two isolation groups (Scheduler.isolate),
        so the step is retried without its suspects mixed together and only a request that breaks
        every step it is in fails."""
        outputs = self._read_in_flight()  # their tokens of the previous step: requeueing needs them read
        suspects = [seq for seq in seqs if not seq.is_finished]
        if len(suspects) <= 1:
            return outputs + self._fail(suspects, exc)
        logger.warning("a step of %d requests failed (%s: %s); retrying them in two groups",
                       len(suspects), type(exc).__name__, exc)
        self.scheduler.isolate(suspects)
        return outputs

    def _token_masks(self, seqs: list[Sequence], read_drafts: Callable[[], list[list[int]]] | None = None
                     ) -> torch.Tensor | None:
        """Host bitmasks of a step's rows (their grammars have seen every token before this
        step): [len(seqs), W], or with read_drafts (a speculative step) [len(seqs), k + 1, W] for
        the verified positions, each row's grammar advanced through its drafts; None when no row
        is constrained."""
        if all(seq.grammar is None or seq.is_finished for seq in seqs):
            return None
        matchers = [None if seq.is_finished else seq.grammar for seq in seqs]
        pin = self.device.type == "cuda"
        if read_drafts is None:
            return self.structured.fill_masks(matchers, pin=pin)
        return self.structured.fill_masks(matchers, pin=pin, drafts=read_drafts(),
                                          positions=self.options.num_speculative_tokens + 1)

    def _read_in_flight(self) -> list[RequestOutput]:
        handle, self._in_flight = self._in_flight, None
        if handle is None:
            return []
        try:
            tokens = handle.tokens()
            logprobs = handle.logprobs(tokens) if handle.has_logprobs else None
        except Exception as exc:
            return self._fail(handle.seqs, exc)
        self.runner.fill_prompts(handle)
        outputs, requests, speculative, reserved = [], self._requests, handle.speculative, handle.reserved
        accept = None if self.structured is None else self.structured.accept
        for i, (seq, new_tokens) in enumerate(zip(handle.seqs, tokens)):
            if seq.status is FINISHED:  # finished or aborted after this step was launched: drop the tokens
                continue
            state = requests[seq.request_id]
            if speculative:
                self.spec_stats.record(len(new_tokens) - 1, *handle.proposals[i])
            seq.num_pending -= 1
            if reserved is not None:
                seq.num_reserved -= reserved[i] - len(new_tokens)  # slots reserved but not used
            try:
                out = state.read(new_tokens, None if logprobs is None else logprobs[i], accept)
            except Exception as exc:  # e.g. detokenization: this request's own host work failed
                outputs += self._fail([seq], exc)
                continue
            if out is None:  # a final_only request that goes on
                continue
            if out.finished:
                del requests[seq.request_id]
                self._release(seq)
            outputs.append(out)
        return outputs

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> list[RequestOutput]:
        message = f"{type(exc).__name__}: {exc}"
        outputs = []
        for seq in seqs:
            state = self._requests.get(seq.request_id)
            if state is None or state.seq is not seq:  # its final output was already made
                continue
            seq.finish("error", error=message)
            self._release(seq)
            try:
                outputs.append(self._output(state, []))
            except Exception:  # its text cannot be made either (the detokenizer failed): none then
                self._requests.pop(seq.request_id, None)
                outputs.append(RequestOutput(
                    request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                    token_ids=list(seq.output_token_ids), text="", finish_reason="error", error=message,
                    logprobs=seq.logprobs,
                ))
        return outputs

    def _release(self, seq: Sequence) -> None:
        if self._held_releases is not None:
            self._held_releases.append(seq)
            return
        self.scheduler.finish(seq)
        self.runner.release(seq)

    def _output(self, state: RequestState, new_tokens: list[int], by_token: bool = False) -> RequestOutput:
        """The request's output (RequestState.output); a finished request is forgotten here (the
        caller releases it like any finished request)."""
        out = state.output(new_tokens, by_token)
        if out.finished:
            del self._requests[out.request_id]
        return out
