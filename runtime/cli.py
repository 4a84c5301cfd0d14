"""`glmrt ocr IMAGE... [--model M] [--task text|table|formula] [--schema FILE] [--json] [options]`.

Each image is its own request; results print as each one finishes. Exit codes: 0 all images
recognised, 1 an image or the model failed or a --schema output is incomplete JSON, 2 usage error,
130 interrupted (Ctrl-C).

torch, the engine, the server and the document pipeline are imported by the subcommand that runs
them, after its command line is checked: --help, --version and usage errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm

from . import __version__
from .documents import DEFAULT_LAYOUT_MODEL
from .extraction import as_json_schema
from .outputs import RequestOutput
from .prompts import TASK_PROMPTS, task_prompt
from .sampling_params import DRAFT_SOURCES, SamplingParams

DEFAULT_MODEL = "zai-org/GLM-OCR"
DEFAULT_IMAGE_MODEL = "zai-org/GLM-Image"
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_tokens", "gpu_memory_utilization",
                "block_size", "image_backend", "num_speculative_tokens", "speculative_method", "speculative_max_batch",
                "max_logprobs")

SERVE_DESCRIPTION = """\
an OpenAI-compatible server (POST /v1/chat/completions, /v1/completions; GET /v1/models, /health,
/metrics) for the glmocr SDK, docling and any OpenAI client. Sampling fields a request leaves out
take the checkpoint's generation_config.json values, then the glmocr SDK's (greedy,
repetition_penalty 1.1, max_tokens 8192). A GLM-Image pipeline checkpoint is served as OpenAI's
images API instead (POST /v1/images/generations, /v1/images/edits; needs glmrt[image])."""

EPILOG = """\
sampling flags left out take their values from the checkpoint's generation_config.json
(GLM-OCR's: greedy). An output cut at --max-tokens is printed with a warning on stderr; with
--schema it is incomplete JSON, an error. On a terminal, progress shows on stderr. Ctrl-C prints
the text the running images had so far, marked as interrupted (finish_reason "abort" with --json).
exit status: 0 ok, 1 an image or the model failed or a --schema output is incomplete JSON (one
line each on stderr), 2 usage error (also an input that is missing, a directory or a PDF: see
glmrt parse), 130 interrupted. GLMRT_DEBUG=1 shows full tracebacks instead of one-line errors."""


IMAGE_EPILOG = """\
GLM-Image's whole pipeline in this process: glmrt's autoregressive stage (all prompts together),
then diffusers' diffusion transformer and VAE from the same checkpoint (needs glmrt[image]). With
one prompt, -o is the PNG file (a path ending in .png) or a folder; with several, a folder (made
if missing) that gets one PNG per prompt: N-SLUG.png, N the prompt's place on the command line
from 1 (zero-padded to the same width), SLUG its first 40 letters and digits, lowercased, other
runs of characters as '-'. The written paths print on stdout. --image gives condition images
(image-to-image), the same ones for every prompt. With --temperature 0 and the same --seed the
PNG is byte-identical to diffusers' own pipeline's. On a terminal, progress shows on stderr.
exit status: 0 written, 1 the model failed, 2 usage error (a bad size, prompt or --image; checked
before anything loads), 130 interrupted."""

PARSE_EPILOG = """\
pages are rendered at --dpi (long side at most 3500 px), laid out with PP-DocLayoutV3, and every
text, table and formula region is recognised with the glmocr SDK's prompts (greedy, repetition
penalty 1.1); figures are saved under imgs/. Re-running skips the pages and documents already
done with the same --model, --layout-model, --no-layout, --dpi and --max-tokens, and parses failed
pages again (a document with failed pages is written without them; <name>_status.json lists
them). --draft: speculative decoding, the same output sooner. auto (default) drafts each region
from the PDF's own text inside it (born-digital pages), then from n-gram lookup over what it has
written, without an MTP layer (8 tokens per step); text and ngram only one of those; mtp the
checkpoint's MTP layer (3 tokens); off none. --num-speculative-tokens, --speculative-method or
--speculative-config, when given, set the engine instead. exit status: 0 all documents written
without a failure; 1 some document, page or region failed (reported on stderr, the rest written),
or a model could not be loaded; 2 usage error; 130 interrupted."""


class UsageError(Exception):
    """A bad command line that argparse cannot see (e.g. an unreadable --schema file): exit 2."""


class _Parser(argparse.ArgumentParser):
    """glmrt's parsers. Flags are taken only in full: an abbreviation (--max-token) is a typo to
    report, not a guess. A subcommand reports an unknown flag itself, with its own usage (argparse
    leaves it to `glmrt`'s, which lists none of the subcommand's flags)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glmrt", description="GLM-OCR inference runtime", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"glmrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ocr = sub.add_parser("ocr", help="recognise text, tables, formulas or JSON fields in images",
                         epilog=EPILOG)
    ocr.add_argument("images", nargs="+", help="image files (each one is its own request; PDFs: glmrt parse)")
    ocr.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or Hub id (default: {DEFAULT_MODEL})")
    ocr.add_argument("--task", choices=sorted(TASK_PROMPTS), default="text")
    ocr.add_argument("--schema", type=Path,
                     help="information extraction (overrides --task): a JSON file with the model card's template "
                          '(e.g. {"name": "", "items": [{"price": ""}]}) or a JSON Schema; the output is constrained to it')
    ocr.add_argument("--json", action="store_true",
                     help='print one JSON object per image: {"image", "text", "finish_reason", "num_tokens"} '
                          '(finish_reason "length": cut at --max-tokens; "abort": interrupted)')
    sampling = ocr.add_argument_group("sampling (default: the checkpoint's generation_config.json)")
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, help="0 or -1 = off")
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--seed", type=int)
    _add_engine_flags(ocr)
    parse = sub.add_parser("parse", help="PDFs and images to Markdown and JSON: layout, then every region recognised "
                                         "(needs glmrt[documents])", epilog=PARSE_EPILOG)
    parse.add_argument("inputs", nargs="+", help="PDF or image files, or directories of them")
    parse.add_argument("-o", "--output", type=Path, default=Path("output"),
                       help="output folder: <output>/<name>/<name>.md, <name>.json and imgs/ per document "
                            "(default: ./output, as the glmocr SDK)")
    parse.add_argument("--model", default=DEFAULT_MODEL, help=f"GLM-OCR checkpoint (default: {DEFAULT_MODEL})")
    parse.add_argument("--layout-model", default=DEFAULT_LAYOUT_MODEL,
                       help="PP-DocLayoutV3 checkpoint directory or Hub id (default: %(default)s)")
    parse.add_argument("--no-layout", action="store_true", help="recognise each whole page as one text region")
    parse.add_argument("--dpi", type=int, default=200, help="PDF rendering resolution (default 200, as the SDK)")
    parse.add_argument("--max-tokens", type=int, default=8192, help="per region (default 8192, as the SDK)")
    parse.add_argument("--draft", choices=DRAFT_SOURCES, default="auto",
                       help="speculative drafts' source (default auto: the PDF's text, then n-gram lookup; see below)")
    ray = parse.add_argument_group("Ray (needs glmrt[ray]; inputs may then be URIs pyarrow reads: s3://, gs://, ...)")
    ray.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                     help="run as a Ray Data job: on the cluster at ADDRESS, or (no ADDRESS) the one RAY_ADDRESS "
                          "names, else a new local one")
    ray.add_argument("--ray-actors", type=int, help="recognition actors (default: one per GPU x --ray-actors-per-gpu)")
    ray.add_argument("--ray-actors-per-gpu", type=int, help="engines sharing one GPU (default 1)")
    ray.add_argument("--ray-render-tasks", type=int, help="documents rendered at once (default: as CPUs allow)")
    ray.add_argument("--ray-batches-per-actor", type=int,
                     help="layout batches (up to 4 pages) in flight per actor, whose regions share its engine "
                          "(default 4)")
    _add_engine_flags(parse)
    image = sub.add_parser("image", help="GLM-Image: pictures from prompts (and condition images; needs glmrt[image])",
                           epilog=IMAGE_EPILOG)
    image.add_argument("prompts", nargs="+", metavar="PROMPT", help="what to draw (each prompt makes one picture)")
    image.add_argument("-o", "--output", type=Path, required=True, metavar="PATH",
                       help="a .png file (one prompt) or a folder (see below)")
    image.add_argument("--size", type=_image_size, default=(1024, 1024), metavar="WIDTHxHEIGHT",
                       help="pixels, each a multiple of 32 up to 2048 (default 1024x1024; OpenAI's order)")
    image.add_argument("--image", dest="condition_images", nargs="+", action="extend", type=Path, default=[],
                       metavar="FILE", help="condition images (image-to-image), for every prompt (after the prompts)")
    image.add_argument("--model", default=DEFAULT_IMAGE_MODEL,
                       help=f"GLM-Image pipeline directory or Hub id (default: {DEFAULT_IMAGE_MODEL})")
    image.add_argument("--seed", type=int, help="seeds the autoregressive sampling and the diffusion noise")
    image.add_argument("--steps", type=int, help="diffusion steps (default: diffusers', 50)")
    image.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: diffusers', 1.5)")
    ar = image.add_argument_group("autoregressive sampling (default: the checkpoint's generation_config.json)")
    ar.add_argument("--temperature", type=float, help="0 = greedy")
    ar.add_argument("--top-k", type=int, help="0 or -1 = off")
    ar.add_argument("--top-p", type=float)
    _add_engine_flags(image)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs glmrt[serve])",
                           description=SERVE_DESCRIPTION)
    serve.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"checkpoint directory or Hub id (default: {DEFAULT_MODEL})")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="names clients may send as 'model' (default: glm-ocr, or glm-image for a GLM-Image "
                            "checkpoint, and the model argument)")
    serve.add_argument("--api-key", default=os.environ.get("GLMRT_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $GLMRT_API_KEY, else none)")
    serve.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                       help="hosts http(s) image URLs may be fetched from (default: none)")
    serve.add_argument("--allowed-local-media-path", type=Path,
                       help="directory file:// image URLs may read from (default: none)")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="requests accepted beyond --max-num-seqs before answering 503 (default 1024)")
    serve.add_argument("--max-images-per-request", type=int, default=16,
                       help="images per chat request, documents per POST /glmocr/parse, condition images per "
                            "POST /v1/images/edits (default 16)")
    serve.add_argument("--max-pages-per-request", type=int, default=100,
                       help="PDF pages and images per POST /glmocr/parse, all its documents together (default 100)")
    serve.add_argument("--max-image-pixels", type=int,
                       help="decoded pixels (width x height) per image (default: PIL's limit, 89478485)")
    serve.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024, help="request body size")
    serve.add_argument("--max-queued-images", type=int, default=32,
                       help="GLM-Image: pictures admitted and not yet rendered (in the AR stage, waiting for or in "
                            "the diffusion stage) before answering 503 (default 32)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, how long requests in flight may run on before they are ended "
                            "with a 503 (new requests get a 503 at once; default 30); with --ray, how long a "
                            "replica being stopped lets its requests finish")
    serve.add_argument("--grammar-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="how long a request's structured-output constraint may take to compile before it is "
                            "refused with a 400 (default 10)")
    serve.add_argument("--body-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="how long a request's body may take to arrive before it is answered 408 (default 120)")
    serve.add_argument("--layout-model", default=DEFAULT_LAYOUT_MODEL,
                       help="POST /glmocr/parse's PP-DocLayoutV3 (directory or Hub id; loaded on the first "
                            "document; default: %(default)s)")
    connections = serve.add_argument_group("connection limits (glmrt's own HTTP server; not with --ray)")
    connections.add_argument("--max-connections", type=int, metavar="N",
                             help="open connections at most: past it a new connection closes the one that has waited "
                                  "longest for a request, or gets a 503 (default 8192, or the open-file limit minus "
                                  "256 if lower; the open-file limit is raised to its hard limit at start)")
    connections.add_argument("--header-timeout", type=float, metavar="SECONDS",
                             help="how long a connection may take to send a request's headers, from its first byte "
                                  "(from connecting, for a new one), before a 408 (default 30)")
    connections.add_argument("--max-header-bytes", type=int, metavar="BYTES",
                             help="a request's line and headers at most; more is answered 431 (default 65536)")
    ray = serve.add_argument_group("Ray Serve (needs glmrt[ray])")
    ray.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                     help="serve as a Ray Serve application, one replica per GPU, on the cluster at ADDRESS, or "
                          "(no ADDRESS) the one RAY_ADDRESS names, else a new local one; it ends with this process")
    ray.add_argument("--ray-min-replicas", type=int, help="replicas kept when idle (default 1)")
    ray.add_argument("--ray-max-replicas", type=int, help="replicas at most (default: the cluster's GPUs)")
    ray.add_argument("--ray-target-ongoing-requests", type=int,
                     help="requests per replica (running + queued) that autoscaling holds (default: --max-num-seqs)")
    _add_engine_flags(serve)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    engine.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    engine.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    engine.add_argument("--max-num-seqs", type=int, help="requests decoded together (default 32)")
    engine.add_argument("--max-num-batched-tokens", type=int,
                        help="tokens (decode, prompt and vision patches) per step (default 8192; without chunked "
                             "prefill: max model len)")
    engine.add_argument("--max-model-len", type=int, help="prompt + output tokens per request")
    engine.add_argument("--kv-cache-tokens", type=int, help="KV cache size (default: from GPU memory)")
    engine.add_argument("--gpu-memory-utilization", type=float, help="share of free GPU memory for the KV cache")
    engine.add_argument("--block-size", type=int, help="tokens per KV-cache block (default 16)")
    engine.add_argument("--image-backend", choices=["torchvision", "pil"],
                        help="resize as transformers' default (torchvision) or its PIL image processor")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                        help="prefill whole prompts in steps of their own (running requests wait for them)")
    engine.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                        help="read each step back before scheduling the next (same tokens, slower)")
    engine.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                        help="triton backend: kernels tuned per batch size (a request's output may then change "
                             "with what else is running; see the README's Reproducible output)")
    engine.add_argument("--num-speculative-tokens", type=int,
                        help="draft tokens verified per decode step (default 0: off)")
    engine.add_argument("--speculative-method", choices=["mtp", "ngram"],
                        help="mtp (default): the checkpoint's MTP layer drafts, and requests' reference text and "
                             "n-gram lookup where they propose; ngram: only reference text and n-gram lookup")
    engine.add_argument("--speculative-max-batch", type=int,
                        help="decode steps with more running requests than this do not speculate")
    engine.add_argument("--max-logprobs", type=int,
                        help="the most log-probabilities a request may ask for per token (default 20)")
    engine.add_argument("--speculative-config", type=_speculative_config, metavar="JSON",
                        help='vLLM\'s form, e.g. \'{"method": "mtp", "num_speculative_tokens": 1}\' '
                             '(method mtp or ngram)')


# vLLM's method names -> glmrt's speculative_method
SPECULATIVE_METHODS = {"mtp": "mtp", "glm_ocr_mtp": "mtp", "ngram": "ngram"}


def _speculative_config(text: str) -> dict:
    """vLLM's --speculative-config JSON -> {num_speculative_tokens, speculative_method}."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("method", "mtp") not in SPECULATIVE_METHODS:
        raise argparse.ArgumentTypeError(f'must be an object with "method" one of {sorted(SPECULATIVE_METHODS)}')
    # vLLM's n-gram sizes are accepted and ignored: glmrt's lookups take the longest match (up to 4)
    unknown = set(config) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unsupported fields {sorted(unknown)} (known: method, num_speculative_tokens, "
                                         "prompt_lookup_max, prompt_lookup_min)")
    k = config.get("num_speculative_tokens", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise argparse.ArgumentTypeError(f"num_speculative_tokens must be an int >= 0, got {k!r}")
    return {"num_speculative_tokens": k, "speculative_method": SPECULATIVE_METHODS[config.get("method", "mtp")]}


def _engine_options(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    if args.speculative_config is not None:
        for name, value in args.speculative_config.items():
            if options.get(name, value) != value:
                raise UsageError(f"--speculative-config and --{name.replace('_', '-')} disagree; give one")
            options[name] = value
    if args.enforce_eager:
        options["enforce_eager"] = True
    for flag in ("async_scheduling", "enable_chunked_prefill", "batch_invariant"):
        if not getattr(args, flag):
            options[flag] = False
    return options


def _read_schema(path: Path | None) -> tuple[str | None, dict | None]:
    """--schema FILE (a model-card template or a JSON Schema) -> (its text for the prompt, the JSON
    Schema the output is constrained to); (None, None) without it. Exit 2 when it is unusable."""
    if path is None:
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
        schema = as_json_schema(text, what=f"--schema {path}")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --schema {path}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise UsageError(_one_line(exc).replace("SamplingParams.json_schema", f"--schema {path}")) from exc
    return text, schema


def _check_flags(overrides: dict, options: dict) -> None:
    """Reject bad sampling and engine flag values before the model loads."""
    from .engine import EngineConfig

    for name, value in overrides.items():
        try:
            SamplingParams(**{name: value})
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--{name.replace('_', '-')} {value}: {exc}") from exc
    try:
        EngineConfig(**options)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _check_layout_model(value: str) -> None:
    """--layout-model must name a checkpoint directory or a Hub id: checked before anything loads."""
    from .documents.layout import check_reference

    try:
        check_reference(value)
    except FileNotFoundError as exc:
        raise UsageError(f"--layout-model {exc}") from exc


def _check_images(images: list[str]) -> None:
    """Inputs that glmrt ocr can never read fail before anything loads (exit 2, one line)."""
    for image in images:
        path = Path(image)
        if path.is_dir():
            raise UsageError(f"{image}: is a directory; glmrt ocr takes image files (glmrt parse takes directories)")
        if not path.is_file():
            raise UsageError(f"{image}: no such file")
        if path.suffix.lower() == ".pdf":
            raise UsageError(f"{image}: is a PDF; glmrt ocr takes images, glmrt parse takes PDFs: glmrt parse {image}")


def _fetch(resolve: Callable[[str], Path], reference: str, local: str) -> str:
    """A checkpoint reference -> its directory: a Hub id is fetched now, before anything loads, so
    that offline (or with an unknown id) the error names the model and `local`, the way to give
    a local copy instead (e.g. "--model DIR")."""
    from .loader import HubError

    try:
        return str(resolve(reference))
    except HubError as exc:
        raise HubError(f"{exc}; to run without the Hub, give a local copy: {local}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"  # e.g. a jinja2 TemplateSyntaxError or a tokenizers Exception


def _debug() -> bool:
    return os.environ.get("GLMRT_DEBUG", "") not in ("", "0")


class _Printer:
    """Results to stdout and errors to stderr, flushed as they come, around a progress bar on
    stderr when it is a terminal: of the images done, or for a single image of its tokens (a
    long page would otherwise show no sign of life)."""

    def __init__(self, images: int, max_tokens: int):
        self.unit = "image" if images > 1 else "token"
        total = images if images > 1 else max_tokens
        self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr) if sys.stderr.isatty() else None

    def write(self, text: str, file: TextIO) -> None:
        if self.bar is not None:
            tqdm.write(text, file=file)
        else:
            print(text, file=file)
        file.flush()

    def message(self, kind: str, image: str, problem: Exception | str) -> None:
        """`glmrt: error: IMAGE: ...` (or warning) on one line."""
        text = _one_line(problem) if isinstance(problem, BaseException) else " ".join(str(problem).split())
        self.write(f"glmrt: {kind}: {image}: {text}", sys.stderr)

    def advance(self, unit: str, n: int = 1) -> None:
        if self.bar is not None and unit == self.unit:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ocr(args: argparse.Namespace) -> int:
    schema_text, schema = _read_schema(args.schema)
    _check_images(args.images)
    prompt = task_prompt(args.task, schema_text)
    overrides = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    options = _engine_options(args)
    _check_flags(overrides, options)
    from .llm import LLM
    from .loader import resolve_model_path

    llm = LLM(_fetch(resolve_model_path, args.model, "--model DIR"), device=args.device, dtype=args.dtype,
              backend=args.backend, **options)
    llm.engine.require_text_model("glmrt ocr")
    params = llm.generation_config.sampling_params(**overrides, json_schema=schema)
    engine = llm.engine
    try:
        engine.compile_constraint(params)  # a schema llguidance cannot compile fails once here, not per image
    except ValueError as exc:
        raise UsageError(_one_line(exc).replace("SamplingParams.json_schema", f"--schema {args.schema}")) from exc
    printer = _Printer(len(args.images), params.max_tokens)
    todo = list(reversed(args.images))
    running: dict[str, str] = {}  # request id -> image path
    latest: dict[str, RequestOutput] = {}  # request id -> its last output (text so far)
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
                    printer.message("error", image, exc)
                    printer.advance("image")
            outputs = engine.step()
            printer.advance("token", sum(len(out.delta_token_ids) for out in outputs))
            for out in outputs:
                latest[out.request_id] = out
                if out.finished:
                    del latest[out.request_id]
                    failed += _report(printer, running.pop(out.request_id), out, args, params.max_tokens)
    except KeyboardInterrupt:
        # The text the running images have so far is printed, marked as interrupted; the queued
        # ones never started. abort() gives it, unless the interrupt landed in a step, which
        # then failed its requests: their last output read is what there is.
        for request_id, image in running.items():
            out = engine.abort(request_id) or latest.get(request_id)
            if out is not None:
                _print_result(printer, image, dataclasses.replace(out, finish_reason="abort"), args)
        raise
    finally:
        printer.close()
    return 1 if failed else 0


def _report(printer: _Printer, image: str, out: RequestOutput, args: argparse.Namespace, max_tokens: int) -> bool:
    """A finished image: its text on stdout, and a line on stderr when it failed or was cut at the
    token limit (with --schema that is incomplete JSON: a failure) -> whether it failed."""
    failed = out.finish_reason == "error"
    if failed:  # the model step this request was in raised
        printer.message("error", image, out.error)
    else:
        _print_result(printer, image, out, args)
    if out.finish_reason == "length":
        limit = "--max-tokens" if len(out.token_ids) >= max_tokens else "--max-model-len"  # whichever ended it
        cut = f'cut at {limit} ({len(out.token_ids)} tokens, finish_reason "length")'
        if args.schema is not None:  # not valid JSON
            failed = True
            printer.message("error", image, f"incomplete JSON, {cut}: raise it")
        else:
            printer.message("warning", image, f"{cut}: raise it for the rest")
    printer.advance("image")
    return failed


def _image_size(text: str) -> tuple[int, int]:
    """--size WIDTHxHEIGHT -> (height, width); their range is checked by _image."""
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 1024x768") from None
    return height, width


def _image_paths(prompts: list[str], output: Path) -> list[Path]:
    """Where each prompt's PNG goes: -o itself (a .png path, one prompt only), or N-SLUG.png in the
    folder -o (see IMAGE_EPILOG)."""
    if output.suffix.lower() == ".png":
        if len(prompts) > 1:
            raise UsageError(f"-o {output} is one file for {len(prompts)} prompts; give a folder")
        return [output]
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} is a file, not a folder (or give a path ending in .png)")
    width = len(str(len(prompts)))
    paths = []
    for n, prompt in enumerate(prompts, 1):
        slug = "-".join("".join(c if c.isalnum() else " " for c in prompt.lower()).split())[:40].strip("-")
        paths.append(output / (f"{n:0{width}d}-{slug}.png" if slug else f"{n:0{width}d}.png"))
    return paths


def _image(args: argparse.Namespace) -> int:
    import importlib.util

    from .glm_image import check_image_size
    from .image_processor import load_image

    for i, prompt in enumerate(args.prompts, 1):
        if not prompt.strip():
            raise UsageError(f"prompt {i} is empty")
    height, width = args.size
    try:
        check_image_size(height, width)
    except ValueError as exc:
        raise UsageError(f"--size {width}x{height}: {exc}") from exc
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be from 0 to 2**64 - 1, got {args.seed}")
    paths = _image_paths(args.prompts, args.output)
    conditions = []
    for path in args.condition_images:
        try:
            conditions.append(load_image(str(path)))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--image {path}: {_one_line(exc)}") from exc
    overrides = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p") if getattr(args, name) is not None}
    options = _engine_options(args)
    _check_flags(overrides, options)
    if importlib.util.find_spec("diffusers") is None:
        raise UsageError("glmrt image needs the image extra (diffusers): pip install 'glmrt[image]'")
    from .image_pipeline import ImagePipeline

    pipe = ImagePipeline(args.model, device=args.device, dtype=args.dtype, backend=args.backend, **options)
    prompts = args.prompts
    pictures = pipe(prompts, height=height, width=width, image=[conditions] * len(prompts) if conditions else None,
                    seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    sampling_params=pipe.llm.generation_config.sampling_params(**overrides),
                    progress=sys.stderr.isatty())
    for picture, path in zip(pictures, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        print(path, flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .engine import AsyncEngine
        from .server.app import ServerConfig, build_app
        from .server.connections import connection_limits, guarded_http_protocol, raise_open_file_limit
        from .server.media import MediaPolicy
        from .server.shutdown import serve_with_drain
    except ImportError as exc:
        raise UsageError(f"glmrt serve needs the server extra: pip install 'glmrt[serve]' ({exc})") from exc
    options = _engine_options(args)
    _check_flags({}, options)
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise UsageError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a directory")
    _check_layout_model(args.layout_model)
    names = tuple(args.served_model_name or dict.fromkeys(["glm-ocr", args.model]))
    try:
        config = ServerConfig(
            served_model_names=names, api_key=args.api_key or None, max_queue=args.max_queue,
            max_request_bytes=args.max_request_bytes, max_images_per_request=args.max_images_per_request,
            max_pages_per_request=args.max_pages_per_request,
            layout_model=args.layout_model, shutdown_timeout_s=args.shutdown_timeout,
            grammar_timeout_s=args.grammar_timeout, body_timeout_s=args.body_timeout,
            max_queued_images=args.max_queued_images,
            media=MediaPolicy(allowed_domains=tuple(args.allowed_media_domains),
                              allowed_local_path=args.allowed_local_media_path,
                              **({} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels})),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    given = {"max_connections": args.max_connections, "header_timeout_s": args.header_timeout,
             "max_header_bytes": args.max_header_bytes}
    given = {name: value for name, value in given.items() if value is not None}
    if args.ray is not None:
        if given:
            raise UsageError("--max-connections, --header-timeout and --max-header-bytes limit glmrt's own HTTP "
                             "server; Ray Serve's proxy takes the connections with --ray")
        engine_kwargs = {"device": args.device, "dtype": args.dtype, "backend": args.backend, **options}
        return _serve_on_ray(args, config, engine_kwargs)
    try:
        limits = connection_limits(raise_open_file_limit(), **given)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    from .loader import resolve_model_path

    engine = AsyncEngine(_fetch(resolve_model_path, args.model, "glmrt serve DIR"), device=args.device,
                         dtype=args.dtype, backend=args.backend, **options)
    e = engine.engine  # what the defaults came to on this machine, whatever --log-level says
    diffusion = None
    if e.generates_images:
        diffusion = _diffusion_stage(args.model, e)
        if not args.served_model_name:
            names = tuple(dict.fromkeys(["glm-image", args.model]))
            config = dataclasses.replace(config, served_model_names=names)
    print(f"glmrt: serving {args.model} as {', '.join(names)} on http://{args.host}:{args.port}: device {e.device}, "
          f"dtype {str(e.dtype).removeprefix('torch.')}, backend {e.backend}, max_model_len {e.max_model_len}, "
          f"KV cache {e.kv_capacity_tokens} tokens", file=sys.stderr)
    app = build_app(engine, config, diffusion)
    refused = app.state.metrics.http_requests  # answered before any endpoint is known: endpoint "connection"
    serve_with_drain(app, host=args.host, port=args.port, log_level=args.log_level,
                     http=guarded_http_protocol(limits, lambda status: refused.labels("connection", str(status)).inc()),
                     h11_max_incomplete_event_size=limits.max_header_bytes)
    return 0


def _diffusion_stage(model: str, engine):
    """GLM-Image's diffusion stage for `glmrt serve`, from the pipeline `model` names (its directory
    or Hub id), on the engine's device and dtype."""
    if not (engine.model_path / "model_index.json").is_file():
        raise UsageError(f"{model} is GLM-Image's autoregressive stage alone: serving pictures needs the whole "
                         "pipeline (model_index.json with the transformer, VAE, text encoder and scheduler)")
    from .diffusers_stage import DiffusionStage

    try:
        return DiffusionStage.from_pretrained(model, device=engine.device, dtype=engine.dtype)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc


def _ray_options(args: argparse.Namespace, **names: str) -> dict:
    """The --ray-* flags given -> {keyword: value} under the names `names` maps them to (flags left
    out keep the defaults of the function they go to)."""
    return {keyword: getattr(args, flag) for keyword, flag in names.items() if getattr(args, flag) is not None}


def _check_ray_flags(args: argparse.Namespace) -> None:
    """--ray-* flags mean nothing without --ray: refuse them rather than ignore them."""
    if args.ray is None:
        given = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
                 if name.startswith("ray_") and value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray")


def _serve_on_ray(args: argparse.Namespace, config, engine_kwargs: dict) -> int:
    """The app as a Ray Serve application; it is shut down when this process ends (Ctrl-C, SIGTERM)."""
    try:
        import ray
        from ray import serve

        from .ray.cluster import init
        from .ray.serving import application
    except ImportError as exc:
        raise UsageError(f"glmrt serve --ray needs the ray extra: pip install 'glmrt[ray]' ({exc})") from exc
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the finally below
    init(address=None if args.ray == "auto" else args.ray, log_to_driver=args.log_level == "debug")
    try:
        try:
            app = application(args.model, config, engine_kwargs=engine_kwargs, **_ray_options(
                args, min_replicas="ray_min_replicas", max_replicas="ray_max_replicas",
                target_ongoing_requests="ray_target_ongoing_requests"))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="glmrt", route_prefix="/")
        print(f"glmrt: serving {args.model} as {', '.join(config.served_model_names)} on Ray Serve, "
              f"http://{args.host}:{args.port}", file=sys.stderr)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def _parse(args: argparse.Namespace) -> int:
    try:
        from .documents.layout import resolve_checkpoint
        from .documents.pages import find_documents
        from .documents.pipeline import draft_engine_options, parse
    except ImportError as exc:
        raise UsageError(f"glmrt parse needs the documents extra: pip install 'glmrt[documents]' ({exc})") from exc
    from .loader import resolve_model_path

    for value, name in ((args.dpi, "--dpi"), (args.max_tokens, "--max-tokens")):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    try:
        options = draft_engine_options(args.draft, _engine_options(args))
    except ValueError:  # the only one: --draft mtp without the MTP layer
        raise UsageError("--draft mtp drafts with the MTP layer, which speculative method ngram "
                         "(--speculative-method / --speculative-config) does not load: give --draft auto, text "
                         "or ngram, or method mtp") from None
    _check_flags({}, options)
    if not args.no_layout:
        _check_layout_model(args.layout_model)
    common = dict(model=args.model, layout_model=None if args.no_layout else args.layout_model, device=args.device,
                  dtype=args.dtype, backend=args.backend, dpi=args.dpi, max_tokens=args.max_tokens, draft=args.draft,
                  **options)
    if args.ray is not None:
        results = _parse_on_ray(args, common)
    else:
        try:
            find_documents(args.inputs)  # an input that does not exist or is not a PDF or image
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        common["model"] = _fetch(resolve_model_path, args.model, "--model DIR")
        if not args.no_layout:
            common["layout_model"] = _fetch(resolve_checkpoint, args.layout_model, "--layout-model DIR")
        results = parse(args.inputs, args.output, progress=sys.stderr.isatty(), **common)
    failed = False
    for r in results:
        for error in r.errors:
            # A document that cannot be opened names itself ("<file>: <reason>"); a page or region does not.
            named = error if error.startswith(f"{r.source}: ") else f"{r.source}: {error}"
            print(f"glmrt: error: {named}", file=sys.stderr)
        failed |= bool(r.errors)
        where = r.markdown_path if r.markdown_path is not None else "not written"
        notes = [f"{r.resumed_pages} from an earlier run"] if r.resumed_pages else []
        if r.failed_pages:
            notes.append(f"{len(r.failed_pages)} failed: run again to retry them")
        shown = f" ({'; '.join(notes)})" if notes else ""
        print(f"{r.source}: {r.num_pages} page{'' if r.num_pages == 1 else 's'}{shown} -> {where}", file=sys.stderr)
    return 1 if failed else 0


def _parse_on_ray(args: argparse.Namespace, common: dict) -> list:
    try:
        from .ray.jobs import parse as parse_on_ray
    except ImportError as exc:
        raise UsageError(f"glmrt parse --ray needs the ray extra: pip install 'glmrt[ray]' ({exc})") from exc
    try:
        return parse_on_ray(args.inputs, args.output, address=None if args.ray == "auto" else args.ray,
                            **_ray_options(args, actors="ray_actors", actors_per_gpu="ray_actors_per_gpu",
                                           render_tasks="ray_render_tasks", batches_per_actor="ray_batches_per_actor"),
                            **common)
    except ValueError as exc:  # an input that does not exist or is not a PDF or image; a bad --ray-* value
        raise UsageError(str(exc)) from exc


def _print_result(printer: _Printer, image: str, out: RequestOutput, args: argparse.Namespace) -> None:
    if args.json:
        printer.write(json.dumps({"image": image, "text": out.text, "finish_reason": out.finish_reason,
                                  "num_tokens": len(out.token_ids)}, ensure_ascii=False), sys.stdout)
    elif len(args.images) > 1 or out.finish_reason == "abort":
        interrupted = " (interrupted)" if out.finish_reason == "abort" else ""
        printer.write(f"==> {image}{interrupted} <==\n{out.text}", sys.stdout)
    else:
        printer.write(out.text, sys.stdout)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command in ("serve", "parse"):  # the commands with --ray
            _check_ray_flags(args)
        return {"serve": _serve, "parse": _parse, "ocr": _ocr, "image": _image}[args.command](args)
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
