"""Input processing: how a request becomes a Sequence, one adapter per model family.

- GLM-OCR (`TextInputs`): a prompt, chat messages or raw token ids, and images -> token ids with
  each image's <|image|> slots, M-RoPE positions, uint8 patch pixels; its output is text.
- GLM-Image's autoregressive stage (`ImageTokenInputs`): an ImageRequest -> the prompt (condition
  images' codes still placeholders, filled at prefill), its positions and the precomputed decode
  positions of the target grids; its output is vision-token grids, no text.

An adapter owns its processor, its request checks and what a request's output is decoded with;
the engine core adds what is the engine's (the structured-output matcher, the drafter). Adapters
hold no engine state: `prepare` runs on worker threads.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..config import GlmImageConfig, ModelConfig
from ..generation_config import GenerationConfig
from ..glm_image import GlmImageProcessor, ImageRequest, generation_length
from ..model.positions import glm_image_positions, mrope_positions
from ..outputs import Request
from ..processor import IMAGE_TOKEN, VIDEO_TOKEN, Processor
from ..sampling_params import SamplingParams
from .detokenizer import TokenDecoder
from .sampler import request_seed
from .sequence import Sequence
from .structured import StructuredOutputs


class _Inputs:
    generates_images: bool  # GLM-Image: outputs are vision-token grids, not text
    processor: Processor | GlmImageProcessor

    def __init__(self, config: ModelConfig | GlmImageConfig, generation_config: GenerationConfig):
        self.config = config
        self.generation_config = generation_config
        # An eos token that ends a request is no stop_reason, even when stop_token_ids lists it (vLLM).
        self.eos_token_ids = frozenset(config.text.eos_token_ids + generation_config.eos_token_ids)

    def stop_token_ids(self, params: SamplingParams, vocab: int, vocabulary: str) -> frozenset[int]:
        """The tokens that end a request: its stop_token_ids (checked against the `vocab` ids its
        output can have) and, unless it ignores them, the eos tokens."""
        bad = [t for t in params.stop_token_ids or [] if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids {bad} are not in the {vocabulary} (size {vocab})")
        stop = set(params.stop_token_ids or [])
        return frozenset(stop if params.ignore_eos else stop | self.eos_token_ids)

    def check_engine(self, num_speculative_tokens: int) -> None:
        """Refuse engine options this model family cannot run."""

    def decode_positions_width(self, max_model_len: int) -> int:
        """Columns of the per-row decode position tables the device batch keeps (Sequence.
        decode_positions); 0: a generated token at cache index p is at position p + rope_delta."""
        return 0

    def constraints(self, model_dir: Path) -> StructuredOutputs | None:
        """The structured-output state of this family's requests, or None when they take no
        constraint."""
        return None

    @staticmethod
    def _where(limit: int, max_model_len: int) -> str:
        return "max_model_len" if limit == max_model_len else "the KV cache"


class TextInputs(_Inputs):
    """GLM-OCR: requests (glmrt.Request or its dict form) in, text out."""

    generates_images = False

    def __init__(self, config: ModelConfig, generation_config: GenerationConfig, processor_path: Path,
                 image_backend: str):
        super().__init__(config, generation_config)
        self.processor = Processor.from_pretrained(processor_path, image_backend=image_backend)
        self._decoders = {skip: TokenDecoder(self.processor.tokenizer, skip) for skip in (False, True)}

    def decoder(self, params: SamplingParams) -> Callable[[list[int]], str]:
        """What the request's output tokens are detokenized with."""
        return self._decoders[params.skip_special_tokens]

    def constraints(self, model_dir: Path) -> StructuredOutputs:
        return StructuredOutputs(model_dir / "tokenizer.json", self.config.text.vocab_size, sorted(self.eos_token_ids))

    def prepare(self, request: Request | dict, params: SamplingParams, request_id: str, limit: int,
                max_model_len: int) -> Sequence:
        """The request as a Sequence (no matcher or drafter yet); `limit`: the most tokens one
        request may hold (max_model_len or the KV cache, whichever is smaller)."""
        if isinstance(request, ImageRequest):
            raise ValueError("an ImageRequest needs a GLM-Image checkpoint; this one is GLM-OCR")
        request = Request.coerce(request)
        vocab = self.config.text.vocab_size
        if request.prompt_token_ids is not None:  # a raw prompt: no chat template, no images
            ids, pixel_values, grids = request.prompt_token_ids, None, []
            needs_pixels = {self.processor.image_token_id: IMAGE_TOKEN, self.processor.video_token_id: VIDEO_TOKEN}
            for i, token in enumerate(ids):
                if not 0 <= token < vocab:
                    raise ValueError(
                        f"request['prompt_token_ids'][{i}] = {token} is not in the vocabulary [0, {vocab})"
                    )
                if token in needs_pixels:
                    raise ValueError(
                        f"request['prompt_token_ids'][{i}] = {token} is the {needs_pixels[token]} token, which needs "
                        "pixels; send images with 'prompt' or 'messages'"
                    )
        else:
            processed = self.processor(images=request.images, prompt=request.prompt, messages=request.messages,
                                       normalize=False)
            ids, pixel_values = processed.input_ids, processed.pixel_values
            grids = [tuple(g) for g in processed.image_grid_thw.tolist()] if processed.image_grid_thw is not None else []
        if len(ids) >= limit:
            image_tokens = sum(t * h * w for t, h, w in grids) // self.config.vision.spatial_merge_size**2
            # With images, say so in the words of vLLM's error, which clients (docling-glm-ocr) look
            # for to retry with smaller images.
            hint = (f" ({image_tokens} of them for images: they need more of the encoder cache than one request "
                    "may use; send smaller images)" if image_tokens else "")
            raise ValueError(
                f"request {request_id}: the prompt has {len(ids)} tokens{hint}, which leaves no room to generate "
                f"within {self._where(limit, max_model_len)} ({limit} tokens)"
            )
        stop = self.stop_token_ids(params, vocab, "vocabulary")
        positions, rope_delta = mrope_positions(ids, grids, self.config.image_token_id,
                                                self.config.vision.spatial_merge_size)
        return Sequence(
            request_id=request_id, prompt_token_ids=ids, prompt_positions=positions, rope_delta=rope_delta,
            sampling_params=params, stop_token_ids=stop, max_total_tokens=min(limit, len(ids) + params.max_tokens),
            seed=request_seed(params.seed), pixel_values=pixel_values, image_grid_thw=grids,
            logprobs=None if params.logprobs is None else [],
        )


class ImageTokenInputs(_Inputs):
    """GLM-Image's autoregressive stage: ImageRequests in, vision-token grids out (no text)."""

    generates_images = True

    def __init__(self, config: GlmImageConfig, generation_config: GenerationConfig, processor_path: Path,
                 image_backend: str):
        super().__init__(config, generation_config)
        self.processor = GlmImageProcessor.from_pretrained(processor_path, image_backend, config.vision)

    def decoder(self, params: SamplingParams) -> Callable[[list[int]], str]:
        return _no_text

    def check_engine(self, num_speculative_tokens: int) -> None:
        if num_speculative_tokens:
            raise ValueError("num_speculative_tokens: GLM-Image has no MTP layer to draft with")

    def decode_positions_width(self, max_model_len: int) -> int:
        return max_model_len  # generated tokens follow the target grids' 2D positions

    def prepare(self, request: ImageRequest, params: SamplingParams, request_id: str, limit: int,
                max_model_len: int) -> Sequence:
        """The prompt (condition images' codes still placeholders, filled at prefill), its positions
        and the decode positions of the target grids. max_tokens is set to the grids' length, as
        transformers' pipeline does; generation also stops at image_end."""
        if not isinstance(request, ImageRequest):
            raise TypeError(f"a GLM-Image request must be a glmrt.ImageRequest, got {type(request).__name__}")
        if params.constraint is not None or params.stop:
            raise ValueError("SamplingParams: structured output and stop strings do not apply to image tokens")
        if params.logprobs is not None:
            raise ValueError("SamplingParams.logprobs: GLM-Image requests report no log-probabilities; leave it None")
        stop = self.stop_token_ids(params, self.config.text.output_vocab_size, "vision vocabulary")
        processed = self.processor(request)
        ids, c = processed.input_ids, self.config
        grids = processed.source_grids + processed.target_grids
        positions, decode_positions = glm_image_positions(ids, grids, c.image_start_token_id, c.image_end_token_id)
        params = dataclasses.replace(params, max_tokens=generation_length(processed.target_grids))
        total = len(ids) + params.max_tokens
        if total > limit:
            raise ValueError(f"request {request_id}: {len(ids)} prompt tokens and {params.max_tokens} image tokens "
                             f"exceed {self._where(limit, max_model_len)} ({limit} tokens); ask for a smaller image "
                             "or send smaller condition images")
        return Sequence(
            request_id=request_id, prompt_token_ids=ids, prompt_positions=positions, rope_delta=0,
            sampling_params=params, stop_token_ids=stop, max_total_tokens=total, seed=request_seed(params.seed),
            pixel_values=processed.pixel_values, image_grid_thw=processed.source_grids,
            decode_positions=decode_positions,
        )


def _no_text(token_ids: list[int]) -> str:
    return ""


def input_processor(config: ModelConfig | GlmImageConfig, generation_config: GenerationConfig,
                    processor_path: Path, image_backend: str) -> TextInputs | ImageTokenInputs:
    """The adapter of a checkpoint's model family (its config type, as the model registry)."""
    adapter = ImageTokenInputs if isinstance(config, GlmImageConfig) else TextInputs
    return adapter(config, generation_config, processor_path, image_backend)
