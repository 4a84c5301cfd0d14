"""torchvision's pure-torch transforms on a CPU-only machine, for transformers' reference processors.

The PyPI torchvision 0.28 wheel is a CUDA build whose compiled ops do not register against the CPU
torch. `.ci/run` installs it with `pip install --no-deps torchvision==0.28.0 --target .torchvision`;
`use_vendored_torchvision()` puts that folder on sys.path with empty modules in place of its two
op-registration modules, which is enough for the transforms transformers' processors use. Call it
before transformers is imported (transformers probes torchvision once). Without the folder
(torchvision installed normally, or not at all) nothing changes.
"""
import sys
import types

from glmrt_testing import REPO

TORCHVISION_DIR = REPO / ".torchvision"


def use_vendored_torchvision() -> None:
    if not TORCHVISION_DIR.is_dir() or str(TORCHVISION_DIR) in sys.path:
        return
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.path.insert(0, str(TORCHVISION_DIR))
