"""The model card's prompts, in a module that imports neither torch nor tokenizers: the CLI lists
the tasks in its --help without loading either."""
from __future__ import annotations

from .extraction import extraction_prompt

TASK_PROMPTS = {
    "text": "Text Recognition:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
}


def task_prompt(task: str = "text", schema: str | dict | None = None) -> str:
    """The model card's prompt for a task, or the information-extraction prompt for a JSON
    template or JSON Schema (see glmrt.extraction)."""
    if schema is not None:
        return extraction_prompt(schema)
    if task not in TASK_PROMPTS:
        raise ValueError(f"task {task!r} is not one of {sorted(TASK_PROMPTS)} (or pass a schema)")
    return TASK_PROMPTS[task]
