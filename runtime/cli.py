"""`glmrt ocr IMAGE... [--model M] [--task text|table|formula] [--schema FILE] [--json] [options]`.

Each image is its own request; results print as each one finishes. Exit codes: 0 all images
recognised, 1 an image or the model failed, 2 usage error, 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from . import __version__
from .engine.engine import EngineConfig
from .llm import LLM
from .outputs import RequestOutput
from .processor import TASK_PROMPTS, task_prompt
from .sampling_params import SamplingParams

DEFAULT_MODEL = "zai-org/GLM-OCR"
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
ENGINE_FLAGS = ("max_num_seqs", "max_model_len", "kv_cache_tokens", "gpu_memory_utilization")

EPILOG = """\
sampling flags left out take their values from the checkpoint's generation_config.json
(GLM-OCR's: greedy). exit status: 0 ok, 1 an image or the model failed (one line each on
stderr), 2 usage error, 130 interrupted. GLMRT_DEBUG=1 shows full tracebacks instead of
one-line errors."""


class UsageError(Exception):
    """A bad command line that argparse cannot see (e.g. an unreadable --schema file): exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmrt", description="GLM-OCR inference runtime", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"glmrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    ocr = sub.add_parser("ocr", help="recognise text, tables, formulas or JSON fields in images", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ocr.add_argument("images", nargs="+", help="image files (each one is its own request)")
    ocr.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or Hub id (default: {DEFAULT_MODEL})")
    ocr.add_argument("--task", choices=sorted(TASK_PROMPTS), default="text")
    ocr.add_argument("--schema", type=Path, help="JSON schema file for information extraction (overrides --task)")
    ocr.add_argument("--json", action="store_true",
                     help='print one JSON object per image: {"image", "text", "finish_reason", "num_tokens"}')
    sampling = ocr.add_argument_group("sampling (default: the checkpoint's generation_config.json)")
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, help="0 or -1 = off")
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--seed", type=int)
    engine = ocr.add_argument_group("engine")
    engine.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    engine.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    engine.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    engine.add_argument("--max-num-seqs", type=int, help="requests decoded together (default 32)")
    engine.add_argument("--max-model-len", type=int, help="prompt + output tokens per request")
    engine.add_argument("--kv-cache-tokens", type=int, help="KV cache size (default: from GPU memory)")
    engine.add_argument("--gpu-memory-utilization", type=float, help="share of free GPU memory for the KV cache")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    return parser


def _read_schema(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --schema {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--schema {path} is not valid JSON ({exc})") from exc
    return text


def _check_flags(overrides: dict, options: dict) -> None:
    """Reject bad sampling and engine flag values before the model loads."""
    for name, value in overrides.items():
        try:
            SamplingParams(**{name: value})
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--{name.replace('_', '-')} {value}: {exc}") from exc
    try:
        EngineConfig(**options)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"  # e.g. a jinja2 TemplateSyntaxError or a tokenizers Exception


def _debug() -> bool:
    return os.environ.get("GLMRT_DEBUG", "") not in ("", "0")


class _Printer:
    """Results to stdout and errors to stderr, flushed as they come, around an optional progress
    bar on stderr (shown only on a terminal and for several images)."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="image", file=sys.stderr) if total > 1 and sys.stderr.isatty() else None

    def write(self, text: str, file: TextIO) -> None:
        if self.bar is not None:
            tqdm.write(text, file=file)
        else:
            print(text, file=file)
        file.flush()

    def error(self, image: str, problem: Exception | str) -> None:
        message = _one_line(problem) if isinstance(problem, BaseException) else " ".join(str(problem).split())
        self.write(f"glmrt: error: {image}: {message}", sys.stderr)
        self.advance()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ocr(args: argparse.Namespace) -> int:
    prompt = task_prompt(args.task, _read_schema(args.schema))
    overrides = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    options = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    if args.enforce_eager:
        options["enforce_eager"] = True
    _check_flags(overrides, options)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend, **options)
    params = llm.generation_config.sampling_params(**overrides)
    engine = llm.engine
    printer = _Printer(len(args.images))
    todo = list(reversed(args.images))
    running: dict[str, str] = {}  # request id -> image path
    failed = 0
    try:
        while todo or engine.has_unfinished():
            # At most max_num_seqs requests in the engine (all one step can run): a preprocessed
            # page holds its pixels in memory until it finishes.
            while todo and len(running) < engine.options.max_num_seqs:
                image = todo.pop()
                try:
                    running[engine.add_request({"images": [image], "prompt": prompt}, params)] = image
                except Exception as exc:
                    if _debug():
                        raise
                    failed += 1
                    printer.error(image, exc)
            for out in engine.step():
                if not out.finished:
                    continue
                image = running.pop(out.request_id)
                if out.finish_reason == "error":  # the model step this request was in raised
                    failed += 1
                    printer.error(image, out.error)
                else:
                    _print_result(printer, image, out, args)
    except KeyboardInterrupt:
        for request_id in running:
            engine.abort(request_id)
        raise
    finally:
        printer.close()
    return 1 if failed else 0


def _print_result(printer: _Printer, image: str, out: RequestOutput, args: argparse.Namespace) -> None:
    if args.json:
        printer.write(json.dumps({"image": image, "text": out.text, "finish_reason": out.finish_reason,
                                  "num_tokens": len(out.token_ids)}, ensure_ascii=False), sys.stdout)
    elif len(args.images) > 1:
        printer.write(f"==> {image} <==\n{out.text}", sys.stdout)
    else:
        printer.write(out.text, sys.stdout)
    printer.advance()


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _ocr(args)
    except KeyboardInterrupt:
        print("glmrt: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _debug():
            raise
        print(f"glmrt: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
