"""glmrt on Ray (needs glmrt[ray]): `parse` runs the document job as a Ray Data pipeline
(glmrt.ray.jobs); `deployment` builds the OpenAI-compatible server as a Ray Serve application
(glmrt.ray.serving)."""
from .jobs import parse

__all__ = ["parse"]
