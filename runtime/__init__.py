"""glmrt: a Triton/CUDA inference runtime for GLM-OCR."""
from .llm import LLM
from .outputs import Request, RequestOutput
from .processor import Processor
from .sampling_params import SamplingParams

__all__ = ["LLM", "Processor", "Request", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
