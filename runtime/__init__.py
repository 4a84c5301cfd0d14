"""glmrt: a Triton/CUDA inference runtime for GLM-OCR and GLM-Image (its autoregressive stage; the whole
pipeline with glmrt[image])."""
__version__ = "0.1.0"  # keep in step with pyproject.toml

# The public names are imported on first use, not with glmrt: `glmrt --version`, `--help` and a
# usage error then answer without importing torch (seconds).
_EXPORTS = {"GenerationConfig": ".generation_config", "ImagePipeline": ".image_pipeline", "ImageRequest": ".glm_image",
            "ImageTokensOutput": ".glm_image", "IncompleteOutputError": ".outputs", "LLM": ".llm",
            "Processor": ".processor", "Request": ".outputs", "RequestOutput": ".outputs",
            "SamplingParams": ".sampling_params"}

__all__ = [*_EXPORTS, "parse"]


def parse(inputs, output_dir, **options):
    """Documents to Markdown and JSON (needs glmrt[documents]); see glmrt.documents.pipeline.parse."""
    from .documents.pipeline import parse as parse_documents

    return parse_documents(inputs, output_dir, **options)


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. glmrt.ray (glmrt[ray])
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
