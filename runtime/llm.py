"""glmrt.LLM: the offline Python API (vLLM's shape)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .engine import LLMEngine
from .extraction import as_json_schema
from .glm_image import ImageRequest, ImageTokensOutput, generation_length
from .outputs import IncompleteOutputError, Request, RequestOutput
from .prompts import task_prompt
from .sampling_params import SamplingParams


class LLM:
    """Load a GLM-OCR or GLM-Image checkpoint (local directory or Hub id) and generate: text with
    `generate` / `ocr` (GLM-OCR), image tokens with `generate_image_tokens` (GLM-Image's
    autoregressive stage; "zai-org/GLM-Image" fetches only its vision_language_encoder and
    processor folders).

    device / dtype accept strings ("cpu", "cuda", "float32", "bfloat16", ...) or torch objects;
    by default CUDA + bfloat16 when a GPU is present, else CPU + float32. backend "auto" is
    "triton" on CUDA and "torch" on CPU. Other options: max_num_seqs, max_num_batched_tokens,
    enable_chunked_prefill, max_model_len, kv_cache_tokens, gpu_memory_utilization, block_size,
    enforce_eager, async_scheduling (see EngineConfig).
    Requests without SamplingParams use the checkpoint's generation_config.json defaults.
    """

    def __init__(self, model: str, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, backend: str = "auto", **options: Any):
        self.engine = LLMEngine(model, device=device, dtype=dtype, backend=backend, **options)
        self.generation_config = self.engine.generation_config

    @property
    def processor(self):
        return self.engine.processor

    def get_default_sampling_params(self) -> SamplingParams:
        """A fresh SamplingParams with the checkpoint's generation_config.json defaults."""
        return self.generation_config.sampling_params()

    def generate(self, requests: Request | dict | Sequence[Request | dict],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every request to completion (batched); outputs come back in request order.
        sampling_params: one for all requests, one per request, or None for the defaults."""
        if isinstance(requests, (Request, dict)):
            requests = [requests]
        requests = list(requests)
        return self.engine.generate(requests, _final_only(self._params_list(sampling_params, len(requests))))

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        """One SamplingParams per request: given once for all, per request, or None (defaults)."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a glmrt.SamplingParams, got {type(p).__name__}")
            if len(params) != n:
                raise ValueError(f"{len(params)} sampling_params for {n} requests")
        else:
            raise TypeError(
                "sampling_params must be a glmrt.SamplingParams, a list of them or None, "
                f"got {type(sampling_params).__name__}"
            )
        return params

    def generate_image_tokens(self, prompt: str | Sequence[str], height: int, width: int,
                              images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                              sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                              use_tqdm: bool = False) -> list[ImageTokensOutput]:
        """GLM-Image's autoregressive stage for one prompt or many (batched): the token grids of an
        image of height x width pixels, for the diffusion decoder. images: the condition images
        (image-to-image) of the one prompt, or one list per prompt. sampling_params: defaults to
        the checkpoint's generation_config.json; max_tokens is always the target grids' length.
        use_tqdm: a progress bar (stderr) over the tokens of all prompts together.
        One output per prompt, in order."""
        if not self.engine.generates_images:
            raise ValueError("generate_image_tokens needs a GLM-Image checkpoint; this one is GLM-OCR (use generate)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if images is None or len(images) == 0:
            per_prompt = [[] for _ in prompts]
        elif isinstance(prompt, str):
            per_prompt = [list(images)]
        else:
            per_prompt = [list(x) if isinstance(x, (list, tuple)) else None for x in images]
            if None in per_prompt or len(per_prompt) != len(prompts):
                raise ValueError(f"images must hold one list of condition images per prompt ({len(prompts)} prompts)")
        requests = [ImageRequest(p, height, width, imgs) for p, imgs in zip(prompts, per_prompt)]
        params = self._params_list(sampling_params, len(requests))
        seqs = self.engine.prepare_many(requests, params if use_tqdm else _final_only(params))
        if use_tqdm:  # fed every step's outputs
            with _TokenProgress(sum(generation_length(r.targets) for r in requests)) as progress:
                outputs = self.engine.run(seqs, on_output=progress.update)
        else:
            outputs = self.engine.run(seqs)
        c = self.engine.config
        return [ImageTokensOutput.from_output(out, request, seq.image_grid_thw, c.image_start_token_id,
                                              c.image_end_token_id)
                for out, request, seq in zip(outputs, requests, seqs)]

    def ocr(self, image: Any, task: str = "text", schema: str | dict | None = None,
            sampling_params: SamplingParams | None = None) -> str:
        """Recognise one image: task "text" | "table" | "formula", or extract fields as JSON with
        `schema`: the model card's example template (`{"name": "", "items": [{"price": ""}]}`) or
        a JSON Schema, as a dict or JSON text. The prompt is the model card's (with the template;
        a schema is shown as the template it describes) and the output is constrained to the
        schema (a template's: every key, in order, strings at the leaves).

        Text cut at max_tokens is returned as far as it got (call `generate` to see its
        finish_reason); JSON cut there is not valid JSON, so with a schema an output that did not
        finish raises IncompleteOutputError, whose `output` is the RequestOutput."""
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if schema is not None:
            if params.constraint is not None:
                raise ValueError(f"sampling_params already carries a constraint ({params.constraint}); "
                                 "ocr(schema=...) sets its own")
            params = dataclasses.replace(params, json_schema=as_json_schema(schema))
        request = Request(prompt=task_prompt(task, schema), images=[image])
        out = self.generate(request, params)[0]
        if schema is not None and out.finish_reason != "stop":
            raise IncompleteOutputError(out)
        return out.text


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """params for requests whose outputs are read only when they finish (as vLLM's LLM.generate)."""
    copies: dict[int, SamplingParams] = {}  # one copy per distinct object (often one for all requests)
    for p in params:
        if id(p) not in copies:
            copies[id(p)] = dataclasses.replace(p, output_kind="final_only")
    return [copies[id(p)] for p in params]


class _TokenProgress:
    """A tqdm bar over the tokens a batch generates, fed each output as it is read back."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="token", desc="image tokens", dynamic_ncols=True)
        self.counts: dict[str, int] = {}  # request id -> tokens counted so far

    def update(self, output: RequestOutput) -> None:
        n = len(output.token_ids)
        self.bar.update(n - self.counts.get(output.request_id, 0))
        self.counts[output.request_id] = n

    def __enter__(self) -> "_TokenProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
