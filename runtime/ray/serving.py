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
        from ..engine import AsyncEngine

        self.engine = AsyncEngine(model, **engine_kwargs)
        self.config = config

    def __serve_build_asgi_app__(self):
        from ..server.app import build_app

        return build_app(self.engine, self.config)


def deployment_options(config: ServerConfig, *, gpus: int, max_num_seqs: int = 32, min_replicas: int = 1,
                       max_replicas: int | None = None, target_ongoing_requests: int | None = None,
                       gpus_per_replica: float | None = None) -> dict:
    """serve.deployment's options for a cluster with `gpus` GPUs: max_replicas default one per GPU
    (1 without GPUs); target_ongoing_requests default max_num_seqs (a full batch per replica);
    gpus_per_replica default 1 where there are GPUs, else 0."""
    for name, value, least in (("min_replicas", min_replicas, 0), ("max_replicas", max_replicas, 1),
                               ("target_ongoing_requests", target_ongoing_requests, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    max_replicas = max_replicas or max(1, gpus)
    if max_replicas < min_replicas:
        raise ValueError(f"max_replicas ({max_replicas}) must be >= min_replicas ({min_replicas})")
    return {
        "name": "glmrt",
        "ray_actor_options": {"num_gpus": (1 if gpus else 0) if gpus_per_replica is None else gpus_per_replica},
        "max_ongoing_requests": max_num_seqs + config.max_queue,  # what the app takes before its own 503
        # a replica being stopped (scale-down, shutdown) lets its requests finish this long, as
        # `glmrt serve` drains on SIGTERM
        "graceful_shutdown_timeout_s": config.shutdown_timeout_s,
        "autoscaling_config": {"min_replicas": min_replicas, "initial_replicas": max(min_replicas, 1),
                               "max_replicas": max_replicas,
                               "target_ongoing_requests": target_ongoing_requests or max_num_seqs},
    }


def application(model: str, config: ServerConfig, *, engine_kwargs: dict | None = None, **options):
    """A Ray Serve application serving `model` as `glmrt serve` does, sized for the cluster this
    process is connected to (deployment_options' options); run it with
    `ray.serve.run(app, route_prefix="/")`."""
    import ray
    from ray import serve

    engine_kwargs = dict(engine_kwargs or {})
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    settings = deployment_options(config, gpus=gpus, max_num_seqs=engine_kwargs.get("max_num_seqs") or 32, **options)
    return serve.deployment(serve.ingress()(GlmrtReplica), **settings).bind(model, engine_kwargs, config)
