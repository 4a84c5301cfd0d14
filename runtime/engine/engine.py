"""LLMEngine: requests in, outputs out, one scheduler step at a time."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..loader import resolve_model_path
from ..model.glm_ocr import GlmOcrModel
from ..model.text import AttentionMetadata
from ..model.ops import make_ops
from ..model.positions import mrope_positions
from ..outputs import Request, RequestOutput
from ..processor import Processor
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .runner import ModelRunner, allocate_kv_cache, kv_bytes_per_token
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        resolved = _DTYPES[dtype.removeprefix("torch.")]
    else:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or a torch floating dtype")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {resolved} is not supported (float32, bfloat16, float16)")
    return resolved


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend {backend!r} is not one of 'auto', 'torch', 'triton'")
    return backend


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # default: max_model_len
    max_model_len: int | None = None  # default: min(16384, the model's max positions)
    kv_cache_tokens: int | None = None  # default: max_model_len tokens on CPU, memory-based on GPU
    gpu_memory_utilization: float = 0.9  # share of the GPU memory left after weights + peak activations
    block_size: int = 16
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_num_batched_tokens", "max_model_len", "kv_cache_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


class LLMEngine:
    def __init__(self, model: str, *, device=None, dtype=None, backend: str = "auto", **options):
        self.options = EngineConfig(**options)
        path = resolve_model_path(model)
        self.config = ModelConfig.from_pretrained(path)
        self.processor = Processor.from_pretrained(path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.backend = resolve_backend(backend, self.device)
        self.model = GlmOcrModel.from_pretrained(path, self.config, make_ops(self.backend), self.device, self.dtype)
        text = self.config.text
        self.max_model_len = min(self.options.max_model_len or 16384, text.max_position_embeddings)
        block_size = self.options.block_size
        num_blocks = -(-self._kv_cache_tokens() // block_size)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager, self.options.max_num_seqs, self.options.max_num_batched_tokens or self.max_model_len
        )
        use_graphs = self.device.type == "cuda" and self.backend == "triton" and not self.options.enforce_eager
        self.runner = ModelRunner(
            self.model, num_blocks, block_size, Sampler(use_kernels=self.backend == "triton"),
            graph_max_num_seqs=self.options.max_num_seqs if use_graphs else 0,
            max_blocks_per_seq=-(-self.max_model_len // block_size),
        )
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    def _kv_cache_tokens(self) -> int:
        if self.options.kv_cache_tokens is not None:
            return self.options.kv_cache_tokens
        if self.device.type != "cuda":
            return self.max_model_len
        # gpu_memory_utilization is the fraction of the memory still free once the weights and the
        # peak activations of the worst step are accounted for that goes to the KV cache.
        peak = self._profile_peak_memory()
        free, total = torch.cuda.mem_get_info(self.device)
        other = total - free - torch.cuda.memory_reserved(self.device)  # other processes, CUDA context
        budget = int((total - other - peak) * self.options.gpu_memory_utilization)
        tokens = budget // kv_bytes_per_token(self.model)
        if tokens < self.max_model_len:
            raise ValueError(
                f"only {max(tokens, 0)} KV-cache tokens fit in GPU memory at gpu_memory_utilization="
                f"{self.options.gpu_memory_utilization}; need max_model_len={self.max_model_len}"
            )
        return tokens

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Peak bytes of the worst step: a vision pass over the largest page, then a prefill of
        max_num_batched_tokens tokens with logits for max_num_seqs rows (no KV is written)."""
        model, device = self.model, self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        ip = self.processor.image_processor
        patches = ip.max_pixels // (ip.patch_size**2 * ip.temporal_patch_size)
        m = ip.merge_size
        h = max(m, int(patches**0.5) // m * m)
        w = max(m, patches // h // m * m)
        model.encode_images(torch.zeros(h * w, self.config.vision.patch_dim, device=device), [(1, h, w)])
        tokens = self.options.max_num_batched_tokens or self.max_model_len
        kv = allocate_kv_cache(model, 1, self.options.block_size)
        attn = AttentionMetadata(
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
            cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=device), max_seqlen=tokens,
        )
        positions = torch.arange(tokens, device=device).expand(3, -1)
        hidden = model.forward(torch.zeros(tokens, dtype=torch.int64, device=device), positions, attn, kv)
        model.compute_logits(hidden[: self.options.max_num_seqs])
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del kv, hidden
        torch.cuda.empty_cache()
        return peak

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add_request(self, request: Request | dict, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request; errors name the problem and leave other requests untouched."""
        return self.enqueue(self.prepare(request, sampling_params, request_id))

    def prepare(self, request: Request | dict, sampling_params: SamplingParams | None = None,
                request_id: str | None = None) -> Sequence:
        """Validate and preprocess a request into a Sequence without touching the scheduler.

        This is the expensive, request-local part (image decoding and patchifying), so the async
        engine runs it in a worker thread while a model step is in flight.
        """
        request = Request.coerce(request)
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a glmrt.SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        processed = self.processor(images=request.images, prompt=request.prompt)
        ids = processed.input_ids
        limit = min(self.max_model_len, self.kv_capacity_tokens)
        if len(ids) >= limit:
            raise ValueError(
                f"request {request_id}: the prompt has {len(ids)} tokens, which leaves no room to generate within "
                f"{'max_model_len' if limit == self.max_model_len else 'the KV cache'} ({limit} tokens)"
            )
        grids = [tuple(g) for g in processed.image_grid_thw.tolist()] if processed.image_grid_thw is not None else []
        positions, rope_delta = mrope_positions(
            ids, grids, self.config.image_token_id, self.config.vision.spatial_merge_size
        )
        stop = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop |= set(self.config.text.eos_token_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Sequence(
            request_id=request_id, prompt_token_ids=ids, prompt_positions=positions, rope_delta=rope_delta,
            sampling_params=params, stop_token_ids=frozenset(stop),
            max_total_tokens=min(limit, len(ids) + params.max_tokens),
            pixel_values=processed.pixel_values, image_grid_thw=grids, generator=generator,
        )

    def enqueue(self, seq: Sequence) -> str:
        if seq.request_id in self._sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self._sequences[seq.request_id] = seq
        skip = seq.sampling_params.skip_special_tokens
        self._detokenizers[seq.request_id] = IncrementalDetokenizer(
            lambda t: self.processor.decode(t, skip_special_tokens=skip)
        )
        self.scheduler.add(seq)
        return seq.request_id

    def generate(self, requests: list[Request | dict], params: list[SamplingParams]) -> list[RequestOutput]:
        """Run the requests to completion, batched; outputs in request order. If any request is
        invalid, the call fails naming it and none of them stays queued."""
        ids = []
        try:
            for request, p in zip(requests, params, strict=True):
                ids.append(self.add_request(request, p))
        except Exception:
            for request_id in ids:
                self.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            for out in self.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is unknown or already done."""
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        seq.finish("abort")
        self.scheduler.finish(seq)
        return self._output(seq, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_request(self, request_id: str) -> bool:
        return request_id in self._sequences

    @property
    def request_ids(self) -> list[str]:
        return list(self._sequences)

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; -> an output (with deltas) for every sequence that advanced."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        tokens = self.runner.run(seqs, is_prefill)
        outputs = []
        for seq, token in zip(seqs, tokens):
            seq.append_token(token)
            new = [] if token in seq.stop_token_ids else [token]
            if seq.is_finished:
                self.scheduler.finish(seq)
            outputs.append(self._output(seq, new))
        return outputs

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        detok = self._detokenizers[seq.request_id]
        delta = detok.add(new_tokens)
        if seq.is_finished:
            delta += detok.finish()
            del self._sequences[seq.request_id], self._detokenizers[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=list(seq.output_token_ids),
            text=detok.text, finish_reason=seq.finish_reason, delta_text=delta, delta_token_ids=new_tokens,
        )
