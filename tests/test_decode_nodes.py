"""How many device nodes one captured decode step puts in its CUDA graph, counted on the CPU.

A decode step of a small decoder is bound by its launches, each one a node of the step's graph
(runtime/engine/graphs.py), so their number is pinned here: the Triton backend (in the
interpreter) on the tiny checkpoint (2 decoder layers), batch bucket 1, the step
`ModelRunner._capture_graphs` captures as its two graphs, the forward and the sampling under the
token masks (`decode_step` runs both), greedy and sampled. A node is
- every Triton kernel launch, counted where every `@triton.jit` kernel is launched (the `run` of
  the class it makes: the interpreter's or the compiler's); the torch calls the interpreter makes
  inside a launch (copying arguments) are not nodes;
- every aten op dispatched on tensors, except those that launch nothing:
  - allocations (`empty`, `empty_like`, `new_empty`, `empty_strided`): carved out of the graph's
    memory pool at capture, no node;
  - ops that write nothing (no mutable argument in their schema) and whose tensor outputs all
    share storage with an input: views (`view`, `_unsafe_view`, `slice`, `select`, `expand`, `t`,
    `unsqueeze`, `as_strided`, `detach`, ...), and `to`, `reshape`, `contiguous` that had nothing
    to do. Judged by what the op returned, so a `to` or `reshape` that copies is a node.
The real model's step is the same remainder plus at most 7 launches for each of its layers.
"""
import functools
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import glmrt
from glmrt.kernels import sampling
from glmrt.model.ops import TorchOps

# Measured. Greedy: 2 layers x 6 launches (4 projections, M-RoPE + KV write, attention: no split-KV
# combine at the tiny context), the final sandwich norm, lm_head, the decode inputs and argmax,
# which applies the token mask and the repetition penalty as it reads the logits (16 launches),
# and 5 torch ops (the
# embedding gather, the presence, counter and next-token updates). 23 when the penalty was a launch
# of its own on an fp32 copy of the logits; 37 with the decode inputs in torch ops (17, not 1).
GREEDY_NODES = 21
# Sampled: the same step with argmax's launch replaced by the fused sampler's (temperature, top-k,
# top-p, the seeded draw and greedy rows in one kernel), so no more nodes than greedy; 84 when the
# sampled path was torch ops (a vocabulary sort, a softmax, the hash: ~60 of them).
SAMPLED_NODES = 21

aten = torch.ops.aten
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided}


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


class _NodeCounter(TorchDispatchMode):
    """Counts the nodes (see the module docstring) of what runs under it, by name."""

    def __init__(self, kernel_class: type, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.nodes: Counter[str] = Counter()
        self.in_launch = False
        launch = kernel_class.run

        def counted(kernel, *args, **kwargs):
            self.nodes[f"triton {kernel.fn.__name__}"] += 1
            self.in_launch = True
            try:
                return launch(kernel, *args, **kwargs)
            finally:
                self.in_launch = False

        monkeypatch.setattr(kernel_class, "run", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        aliases = not func._schema.is_mutable and outputs and _storages(outputs) <= _storages((args, kwargs))
        if not self.in_launch and func.overloadpacket not in _ALLOCATIONS and not aliases:
            self.nodes[str(func)] += 1
        return out

    def count(self, run) -> Counter[str]:
        self.nodes.clear()
        with torch.inference_mode(), self:
            run()
        return Counter(self.nodes)


def _breakdown(nodes: Counter[str]) -> str:
    return f"{sum(nodes.values())} nodes:\n" + "\n".join(f"{n:4d}  {op}" for op, n in nodes.most_common())


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    runner = glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="triton").engine.runner
    with torch.inference_mode():  # first calls build what later steps reuse (rotary frequencies)
        for do_sample in (False, True):
            runner.decode_step(1, do_sample)
    return runner


def test_decode_inputs_are_one_launch(runner, monkeypatch):
    counter = _NodeCounter(type(sampling._argmax_kernel), monkeypatch)
    nodes = counter.count(lambda: runner.batch.decode_inputs(1))
    assert nodes == {"triton _decode_inputs_kernel": 1}, _breakdown(nodes)


def test_decode_step_nodes(runner, monkeypatch):
    counter = _NodeCounter(type(sampling._argmax_kernel), monkeypatch)
    greedy = counter.count(lambda: runner.decode_step(1, do_sample=False))
    sampled = counter.count(lambda: runner.decode_step(1, do_sample=True))
    total = sum(greedy.values())
    assert total <= GREEDY_NODES, _breakdown(greedy)
    assert sum(sampled.values()) <= SAMPLED_NODES, _breakdown(sampled)
    # the same step with the decode inputs in torch ops, as before the kernel
    monkeypatch.setattr(runner.batch.ops, "decode_inputs", functools.partial(TorchOps.decode_inputs, runner.batch.ops))
    torch_inputs = counter.count(lambda: runner.decode_step(1, do_sample=False))
    assert total < sum(torch_inputs.values()), _breakdown(torch_inputs)
