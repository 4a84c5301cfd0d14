"""glmrt on Ray (needs glmrt[ray]): `parse` runs the document job as a Ray Data pipeline
(glmrt.ray.jobs); `deployment` builds the OpenAI-compatible server as a Ray Serve application
(glmrt.ray.serving); `init` connects to Ray as both do, with workers that import only installed
packages (glmrt.ray.cluster)."""
from .cluster import init
from .jobs import parse

__all__ = ["init", "parse"]
