"""Connecting to Ray so that its workers import only installed packages."""
from __future__ import annotations

import os
import shutil
import tempfile


def init(address: str | None = None, **kwargs) -> None:
    """ray.init(address, **kwargs) with an empty working_dir in the job's runtime environment.

    Without a working_dir, Ray puts the driver's working directory on every worker's sys.path. Run
    from a glmrt checkout, that makes the checkout's top-level `kernels/` folder importable as
    `kernels` in the workers, in place of the Hub's package that transformers imports, and the
    layout model fails to load there. An empty working_dir (uploaded once, a few bytes) leaves the
    workers' imports to the installed packages. A runtime_env of the caller's is kept, its
    working_dir included; so is the runtime environment of a job submitted with `ray job submit`."""
    import ray

    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    if "working_dir" in runtime_env or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        ray.init(address=address, runtime_env=runtime_env or None, **kwargs)
        return
    empty = tempfile.mkdtemp(prefix="glmrt-ray-")
    try:
        ray.init(address=address, runtime_env={**runtime_env, "working_dir": empty}, **kwargs)
    finally:  # ray.init has packed and uploaded it; workers unpack their own copy
        shutil.rmtree(empty, ignore_errors=True)
