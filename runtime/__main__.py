"""`python -m glmrt ...`: the `glmrt` command line."""
import sys

from .cli import main

sys.exit(main())
