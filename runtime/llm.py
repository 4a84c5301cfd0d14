"""glmrt.LLM: the offline Python API (vLLM's shape)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .engine.engine import LLMEngine
from .extraction import as_json_schema
from .outputs import Request, RequestOutput
from .processor import task_prompt
from .sampling_params import SamplingParams


class LLM:
    """Load a GLM-OCR checkpoint (local directory or Hub id) and generate.

    device / dtype accept strings ("cpu", "cuda", "float32", "bfloat16", ...) or torch objects;
    by default CUDA + bfloat16 when a GPU is present, else CPU + float32. backend "auto" is
    "triton" on CUDA and "torch" on CPU. Other options: max_num_seqs, max_num_batched_tokens,
    max_model_len, kv_cache_tokens, gpu_memory_utilization, block_size, enforce_eager.
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
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(requests)
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a glmrt.SamplingParams, got {type(p).__name__}")
            if len(params) != len(requests):
                raise ValueError(f"{len(params)} sampling_params for {len(requests)} requests")
        else:
            raise TypeError(
                "sampling_params must be a glmrt.SamplingParams, a list of them or None, "
                f"got {type(sampling_params).__name__}"
            )
        return self.engine.generate(requests, params)

    def ocr(self, image: Any, task: str = "text", schema: str | dict | None = None,
            sampling_params: SamplingParams | None = None) -> str:
        """Recognise one image: task "text" | "table" | "formula", or extract fields as JSON with
        `schema`: the model card's example template (`{"name": "", "items": [{"price": ""}]}`) or
        a JSON Schema, as a dict or JSON text. The prompt is the model card's (with the template;
        a schema is shown as the template it describes) and the output is constrained to the
        schema (a template's: every key, in order, strings at the leaves)."""
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if schema is not None:
            if params.grammar is not None:
                raise ValueError("sampling_params already carries a constraint (json_schema, json_object, regex or "
                                 "choice); ocr(schema=...) sets its own")
            params = dataclasses.replace(params, json_schema=as_json_schema(schema))
        request = Request(prompt=task_prompt(task, schema), images=[image])
        return self.generate(request, params)[0].text
