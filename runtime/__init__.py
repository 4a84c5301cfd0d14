"""glmrt: a Triton/CUDA inference runtime for GLM-OCR (and GLM-Image's autoregressive stage)."""
__version__ = "0.1.0"  # keep in step with pyproject.toml

from .generation_config import GenerationConfig
from .glm_image import ImageRequest, ImageTokensOutput
from .llm import LLM
from .outputs import Request, RequestOutput
from .processor import Processor
from .sampling_params import SamplingParams

__all__ = ["GenerationConfig", "ImageRequest", "ImageTokensOutput", "LLM", "Processor", "Request", "RequestOutput",
           "SamplingParams", "parse"]


def parse(inputs, output_dir, **options):
    """Documents to Markdown and JSON (needs glmrt[documents]); see glmrt.documents.pipeline.parse."""
    from .documents.pipeline import parse as parse_documents

    return parse_documents(inputs, output_dir, **options)


def __getattr__(name: str):
    if name == "ray":  # glmrt.ray (needs glmrt[ray]) is imported on first use, not with glmrt
        import importlib

        return importlib.import_module(".ray", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
