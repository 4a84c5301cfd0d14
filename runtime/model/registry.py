"""The model registry: a checkpoint's config type (chosen by its model_type, see
config.load_config) -> the model definition that runs it. Both share the text decoder, ops,
kernels and the engine."""
from __future__ import annotations

from ..config import GlmImageConfig, ModelConfig
from .glm_image import GlmImageModel
from .glm_ocr import GlmOcrModel

MODEL_CLASSES = {ModelConfig: GlmOcrModel, GlmImageConfig: GlmImageModel}


def model_class(config: ModelConfig | GlmImageConfig) -> type[GlmOcrModel] | type[GlmImageModel]:
    return MODEL_CLASSES[type(config)]
