"""glmrt: a Triton/CUDA inference runtime for GLM-OCR."""
__version__ = "0.1.0"  # keep in step with pyproject.toml

from .generation_config import GenerationConfig
from .llm import LLM
from .outputs import Request, RequestOutput
from .processor import Processor
from .sampling_params import SamplingParams

__all__ = ["GenerationConfig", "LLM", "Processor", "Request", "RequestOutput", "SamplingParams"]
