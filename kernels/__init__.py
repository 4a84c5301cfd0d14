"""glmrt's Triton kernels, one kernel family per module (attention, paged, rope, rmsnorm, ...).

Head dims: every kernel pads the head dim to a power of two (at least 16 where it feeds tl.dot)
and masks the padding, so any head dim up to MAX_HEAD_DIM works. Above it the attention tiles no
longer fit an SM's registers. The rotary kernels add a divisibility rule: text M-RoPE rotates pairs
(D even), the vision 2D rope rotates halves, each half split into row and column frequencies
(D a multiple of 4). `check_head_dims` applies all of this to a model's two head dims at once.
"""

MAX_HEAD_DIM = 256


def check_head_dim(name: str, head_dim: int, multiple: int = 1) -> None:
    """Raise ValueError unless head_dim is a multiple of `multiple` in [multiple, MAX_HEAD_DIM]."""
    if not (multiple <= head_dim <= MAX_HEAD_DIM and head_dim % multiple == 0):
        raise ValueError(f"{name} {head_dim} is not supported by the Triton kernels: it must be a "
                         f"multiple of {multiple} from {multiple} to {MAX_HEAD_DIM}")


def check_head_dims(text_head_dim: int, vision_head_dim: int) -> None:
    """Refuse a model whose head dims the Triton kernels cannot run, before any launch.

    text_head_dim (decoder attention, M-RoPE, paged KV cache): even, 2..256.
    vision_head_dim (vision attention, 2D rope): a multiple of 4, 4..256.
    Raises ValueError naming the head dim, its value and the supported set.
    """
    check_head_dim("text head_dim", text_head_dim, 2)
    check_head_dim("vision head_dim", vision_head_dim, 4)


def __getattr__(name: str):
    """A kernel module on first use: `glmrt.kernels.rmsnorm` works without importing it first
    (`import glmrt` does not import the engine, which imports them all)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f".{name}", __name__)
