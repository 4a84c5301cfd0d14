"""`glmrt serve --ray`: the OpenAI-compatible app of `glmrt serve` as a Ray Serve application.

Each replica holds one AsyncEngine on one GPU (num_gpus=1; none on a cluster without GPUs) and
serves the very same FastAPI app (`build_app`), so requests, answers, errors, streaming and
/glmocr/parse are those of `glmrt serve`. Ray Serve's proxy routes each request to a replica and
scales the replica count between min and max on queue length: it adds replicas while the
ongoing requests per replica (running + waiting in the engine) stay above
`target_ongoing_requests`, and removes them when they fall below. GET /metrics and /health answer
for the replica the request reached.
"""
from __future__ import annotations

from ..server.app import ServerConfig


class GlmrtReplica:
    """One replica: the engine, then the app over it (Serve calls __serve_build_asgi_app__)."""

    def __init__(self, model: str, engine_kwargs: dict, config: ServerConfig):
        from ..engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(model, **engine_kwargs)
        self.config = config

    def __serve_build_asgi_app__(self):
        from ..server.app import build_app

        return build_app(self.engine, self.config)


def application(model: str, config: ServerConfig, *, engine_kwargs: dict | None = None, min_replicas: int = 1,
                max_replicas: int | None = None, target_ongoing_requests: int | None = None,
                gpus_per_replica: float | None = None):
    """A Ray Serve application serving `model` as `glmrt serve` does; run it with
    `ray.serve.run(app, route_prefix="/")`.

    max_replicas: default one per GPU of the cluster (1 without GPUs). target_ongoing_requests:
    the queue length per replica that autoscaling keeps (default: the engine's max_num_seqs, a
    full batch). gpus_per_replica: default 1 where the cluster has GPUs, else 0."""
    import ray
    from ray import serve

    engine_kwargs = dict(engine_kwargs or {})
    max_num_seqs = engine_kwargs.get("max_num_seqs") or 32
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    max_replicas = max_replicas or max(1, gpus)
    for name, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas),
                        ("target_ongoing_requests", target_ongoing_requests)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if max_replicas < max(min_replicas, 1):
        raise ValueError(f"max_replicas ({max_replicas}) must be >= min_replicas ({min_replicas}) and >= 1")
    deployment = serve.deployment(
        serve.ingress()(GlmrtReplica), name="glmrt",
        ray_actor_options={"num_gpus": (1 if gpus else 0) if gpus_per_replica is None else gpus_per_replica},
        max_ongoing_requests=max_num_seqs + config.max_queue,  # what the app takes before its 503
        autoscaling_config={"min_replicas": min_replicas, "initial_replicas": max(min_replicas, 1),
                            "max_replicas": max_replicas,
                            "target_ongoing_requests": target_ongoing_requests or max_num_seqs},
    )
    return deployment.bind(model, engine_kwargs, config)
