"""`glmrt` command line: `glmrt ocr IMAGE... --model M [--task text|table|formula] [--schema FILE] [--json]`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .processor import TASK_PROMPTS, task_prompt
from .sampling_params import DEFAULT_MAX_TOKENS, SamplingParams


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmrt", description="GLM-OCR inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    ocr = sub.add_parser("ocr", help="recognise text, tables, formulas or JSON fields in images")
    ocr.add_argument("images", nargs="+", help="image files (each one is its own request)")
    ocr.add_argument("--model", required=True, help="checkpoint directory or Hub id (e.g. zai-org/GLM-OCR)")
    ocr.add_argument("--task", choices=sorted(TASK_PROMPTS), default="text")
    ocr.add_argument("--schema", type=Path, help="JSON schema file for information extraction (overrides --task)")
    ocr.add_argument("--json", action="store_true", help="print one JSON object per image")
    ocr.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    ocr.add_argument("--repetition-penalty", type=float, default=1.0)
    ocr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ocr.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    ocr.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    return parser


def _ocr(args: argparse.Namespace) -> int:
    from .llm import LLM

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"glmrt: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    schema = None
    if args.schema is not None:
        try:
            schema = args.schema.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"glmrt: cannot read --schema {args.schema}: {exc}", file=sys.stderr)
            return 2
    prompt = task_prompt(args.task, schema)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    params = SamplingParams(max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty)
    outputs = llm.generate([{"images": [p], "prompt": prompt} for p in args.images], params)
    for path, out in zip(args.images, outputs):
        if args.json:
            print(json.dumps({"image": path, "text": out.text, "finish_reason": out.finish_reason,
                              "num_tokens": len(out.token_ids)}, ensure_ascii=False))
        else:
            if len(args.images) > 1:
                print(f"==> {path} <==")
            print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _ocr(args)
    except (ValueError, TypeError) as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
