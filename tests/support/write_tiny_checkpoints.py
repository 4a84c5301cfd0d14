"""`python tests/support/write_tiny_checkpoints.py [DIR]`: the tests' tiny random checkpoints, to try
`glmrt serve` and `glmrt parse` without downloading a model (needs glmrt[test] for transformers).

Writes DIR/glm-ocr (a GLM-OCR checkpoint with every structural feature of the real one, at toy
sizes: it answers random tokens) and DIR/pp-doclayout-v3 (a layout model: random regions);
DIR defaults to ./tiny-checkpoints."""
import sys
from pathlib import Path

from glmrt_testing.tiny_checkpoint import build_tiny_checkpoint
from glmrt_testing.tiny_layout import build_tiny_layout_checkpoint

if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-checkpoints")
    print(build_tiny_checkpoint(root / "glm-ocr"))
    print(build_tiny_layout_checkpoint(root / "pp-doclayout-v3"))
