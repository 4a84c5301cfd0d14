"""Drivers of the engine (glmrt.LLM, the server, the document pipeline, Ray, the CLI) use its public
surface only: LLMEngine/EngineConfig, AsyncEngine, the prepared request (Sequence, what `prepare`
returns) and its stats snapshot; never its parts (scheduler, runner, block manager, sampler...),
by import or by attribute."""
import ast
import re

from glmrt_testing import REPO

RUNTIME = REPO / "runtime"
# What a driver may import: the package glmrt.engine itself (""; its __init__ exports the surface)
# and the modules that define that surface.
PUBLIC = {"", "engine", "async_engine", "sequence", "stats"}
PARTS = re.compile(r"\.(scheduler|runner|block_manager|sampler|structured|spec_stats)\.")


def _outside_the_engine():
    return [p for p in RUNTIME.rglob("*.py") if RUNTIME / "engine" not in p.parents]


def _engine_modules_imported(source, depth):
    """-> the glmrt.engine submodules a module `depth` packages below glmrt imports (relative or
    absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # relative: only those that resolve to glmrt.<module>
                if node.level - 1 != depth:
                    continue
            elif module.startswith("glmrt."):
                module = module[len("glmrt."):]
            else:
                continue
            parts = module.split(".")
            if parts[0] == "engine":
                found.add(parts[1] if len(parts) > 1 else "")
    return found


def test_no_driver_imports_the_engines_parts():
    imports = {p.relative_to(REPO).as_posix(): _engine_modules_imported(p.read_text(), len(p.relative_to(RUNTIME).parts) - 1)
               for p in _outside_the_engine()}
    assert any(imports.values()), "the scan found no import of the engine at all"
    parts = {path: sorted(found - PUBLIC) for path, found in imports.items() if found - PUBLIC}
    assert not parts, f"modules outside runtime/engine import the engine's parts: {parts}"


def test_no_driver_reaches_into_the_engines_parts():
    reaches = {p.relative_to(REPO).as_posix(): PARTS.findall(p.read_text()) for p in _outside_the_engine()}
    assert not {path: found for path, found in reaches.items() if found}


def test_the_scan_finds_parts_however_they_are_imported():
    source = ("from ..engine.scheduler import Scheduler\nfrom glmrt.engine.runner import ModelRunner\n"
              "from ..engine.engine import LLMEngine\nfrom .engine import x\nfrom ...engine.sampler import y\n")
    assert _engine_modules_imported(source, 1) == {"scheduler", "runner", "engine"}
    assert _engine_modules_imported("from ..engine import AsyncEngine\n", 1) == {""}
    assert PARTS.findall("n = len(self.engine.scheduler.waiting)") == ["scheduler"]
