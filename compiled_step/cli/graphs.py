"""``python -m compiled_step graphs``: what Dynamo and Inductor made of FusedStep, as reviewable text.

For each reference configuration (``REFERENCES``) this module runs two real ``FusedStep.step()``
calls on CPU with a *recording backend* and writes one text file into ``graphs/``.

What a step runs (``fused.program``, see ``program.py``): per sharding group, the grads, params and
optimizer state live in flat buffers of 256-element rows, and one step is

1. **Phase A**: one compiled ``norm.partials.partial_of_buffer`` call per sharding group, over the
   group's whole flat grad buffer (the group's grad scale folded in);
2. the collectives (eager, in place on the partial norms), one per process group, then ``'pp'``;
3. the **finish**: one compiled ``norm.finish.finish`` call (total norm, clip coefficient, finite
   flag, skip counter, and every tensor's row of the per-tensor scalar table);
4. **Phase B**: per group, one compiled ``rules.<rule>.update_flat`` call over the flat region
   (params aliased into the flat buffer, and small params the step may not move, staged: copied in
   and out by eager calls around it), and one compiled ``rules.<rule>.update_bucket`` call per
   bucket of ``bucket_size`` large params that stay where they are (FSDP2 shards, FP8 weights);
5. with FP8 weights, one eager call: the amax reduction and the scales.

Each file holds:

* a summary: graphs compiled, graphs compiled by a second step with the lr halved (0), graph
  breaks, Inductor's kernel count (``torch._inductor.metrics.generated_kernel_count``) and bytes
  accessed (``num_bytes_accessed``, which Inductor only computes when its ``inductor_metrics`` log
  is on) per graph, and **bytes per parameter** (below);
* the plan (``fused.plan``): the sharding groups, where their params live (aliased, staged,
  bucketed), the reductions;
* where the collectives sit between the graphs: every call of ``fused.program.calls`` in the order
  step 1 ran them, compiled calls mapped to their graph by ``call.compiled`` (the callable the
  recording backend returned, which carries the graph's index), eager calls and collectives by
  their labels;
* per graph: its inputs (with their sizes at compile time), outputs, Inductor's scheduler nodes,
  the Dynamo FX graph normalised (comments with file paths and line numbers stripped, as
  ``torch._dynamo.testing.normalize_gm`` does) and the post-grad ATen graph Inductor lowered (the
  ``TORCH_LOGS=post_grad_graphs`` text).

**Bytes per parameter** = (bytes accessed by the Phase A graph + bytes accessed by the update graph
that updates the configuration's large params: the flat update for plain tensors, which are all
aliased into the flat buffer, the bucket update for DTensor and FP8 layouts) / (the grad elements
that update processes: its grad inputs at compile time, padding included). Both graphs' byte
counts are at the sizes of that group's calls (checked). fp32 AdamW's floor is 32: read p, g, m, v
and write p, m, v once (28), plus one more read of g for the norm (4). What lies above it: the flat
update's row index and per-tensor table reads; for DTensor layouts, Phase A also reads the grads of
the group's staged small params, which the bucket update does not process.

How the capture works (the torch 2.13 APIs used are private, hence the pinned version), through
public seams of FusedStep only (``backend=``, ``fused.program``, ``fused.plan``):

* ``FusedStep(..., backend=recorder)``: the recorder is a ``torch.compile`` backend that keeps the
  ``GraphModule`` Dynamo hands over, then compiles it with Inductor's ``compile_fx`` while the
  ``post_grad_graphs`` and ``inductor_metrics`` artifact logs are routed to it, and with the FX graph
  and AOTAutograd caches off (a cache hit skips lowering, so neither log would fire). It returns a
  callable that carries the graph's index, which FusedStep exposes as ``call.compiled``.
* Graphs are shared between configurations of one *family* (``Reference.family``): they use one
  recorder, so Dynamo reuses its cache entries and a graph compiles once per family. A graph's byte
  counts are those of the call that compiled it, so configurations of a family have the same
  buffer sizes, and the capture checks that every graph's first call in a configuration has the
  tensor sizes it was compiled at (it raises otherwise): each file is the same whether it is
  captured alone (``--only``) or with the others.
* Distributed configurations run in a one-process gloo world (``HashStore``, rank 0 of 1) with
  real ``DeviceMesh``es of size 1 and real DTensor params, so the plan, its reductions and their
  labels are the ones a sharded run has; every collective is a real ``all_reduce`` over a group of
  one rank.

Reference sizes: every configuration has 4 "large" params of 128 x 256 = 32768 elements and 3 small
ones of 256, 256 and 128 elements. Plain tensors are all aliased into one flat buffer of 515 rows
(one flat update). DTensor params are not moved: the 4 large shards (above the default
``pack_threshold``) are bucketed, ``bucket_size=4`` (the test suite's bucket, so compile time stays
small; FusedStep's default is 16) making exactly one full bucket, and the 3 small ones are staged.

Output is deterministic: no addresses, timestamps, hashes, cache paths or line numbers; running the
command twice gives identical files. Nothing in the files depends on the CPU (they came out identical
with 1 and 2 threads): Inductor's generated C++ does (vector ISA, thread count) and is left out. ``tests/test_graphs.py`` regenerates every file
and compares (``EXPECTTEST_ACCEPT=1`` rewrites them), so any change to a graph shows up as a
reviewed diff.

``dump_run_graphs(out_dir, fused)`` writes the same kind of file for an existing FusedStep (the
demo calls it), by re-running the capture on synthetic tensors that select the run's graphs (its
optimizer hyperparameters, dtypes, device, bucket size, norm type, and the sizes of its flat
regions and first bucket), next to the run's own plan and program, plus Inductor's generated code
(which depends on the CPU's vector ISA and thread count, so it is never part of the goldens).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiled_step import planning
from compiled_step.cli import PACKAGE_PARENT

__all__ = [
    "GOLDEN_TORCH_VERSION",
    "REFERENCES",
    "Reference",
    "Capture",
    "Mismatch",
    "capture",
    "capture_references",
    "render",
    "render_references",
    "compare",
    "write",
    "summary_numbers",
    "goldens_apply",
    "default_out_dir",
    "dump_run_graphs",
    "main",
]

# The goldens in graphs/ are made with this torch; other versions lower differently.
GOLDEN_TORCH_VERSION = "2.13.0"

HEADER_MARK = "# compiled_step graph dump"
REFERENCE_BUCKET_SIZE = 4
LARGE_SHAPE = (128, 256)  # 32768 elements: above FusedStep's default pack_threshold (16384)
N_LARGE = REFERENCE_BUCKET_SIZE  # exactly one full bucket per sharding group (where they are bucketed)
SMALL_SHAPES = ((256,), (256,), (128,))  # biases and norm weights: staged when not aliased
GRAD_SCALE = 3.0  # grads ~ N(0, 9): the total norm is ~1e3, so clipping at 1.0 is active

# The checkout this package lives in (for the default output folder and for stripping paths).
_REPO_ROOT = PACKAGE_PARENT


def goldens_apply() -> tuple[bool, str]:
    """Whether the committed goldens can be compared here, and if not, why (a skip reason)."""
    version = torch.__version__.split("+")[0]
    if version != GOLDEN_TORCH_VERSION:
        return False, (
            f"graph goldens in graphs/ are tied to torch {GOLDEN_TORCH_VERSION}; this is torch {torch.__version__}, "
            "whose Dynamo/Inductor lower differently (regenerate with `python -m compiled_step graphs` to inspect)"
        )
    if not torch.distributed.is_available():
        return False, "graph goldens include distributed configurations; this torch has no torch.distributed"
    return True, ""


def default_out_dir() -> Path:
    """``graphs/`` of the source checkout this package lives in, else ``./graphs``."""
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "compiled_step").is_dir():
        return _REPO_ROOT / "graphs"
    return Path("graphs")


# ---------------------------------------------------------------------------------------------
# Reference configurations
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The tensors and FusedStep arguments of one configuration (built inside the capture world)."""

    params: list[torch.nn.Parameter]
    grads: Callable[[int], list[torch.Tensor]]  # step -> grads, in the params' placements
    fused_kwargs: dict[str, Any] = field(default_factory=dict)
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _values(shapes, dtype, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * scale).to(dtype) for shape in shapes]


def _shapes(n_large: int = N_LARGE, small: Sequence[tuple[int, ...]] = SMALL_SHAPES):
    return [LARGE_SHAPE] * n_large + list(small)


def plain_layout(dtype: torch.dtype, device: str = "cpu", shapes: Sequence[tuple[int, ...]] | None = None,
                 grad_dtype: torch.dtype | None = None) -> Setup:
    """Plain tensors on one device: all aliased into the flat buffers; no reductions."""
    shapes = list(shapes) if shapes is not None else _shapes()
    params = [torch.nn.Parameter(t.to(device)) for t in _values(shapes, dtype, seed=0)]
    grad_dtype = grad_dtype or dtype
    if grad_dtype != dtype:
        for p in params:
            p.grad_dtype = grad_dtype
    return Setup(params, lambda step: [g.to(device) for g in _values(shapes, grad_dtype, 1000 + step, GRAD_SCALE)],
                 notes=["params: plain tensors: FusedStep aliases all of them into its flat buffers (p.data becomes "
                        "a view), so one flat update covers them"])


def _dtensor_setup(dtype: torch.dtype, mesh, placements, notes: list[str]) -> Setup:
    from torch.distributed.tensor import distribute_tensor

    shapes = _shapes()
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t in _values(shapes, dtype, seed=0)]

    def grads(step):
        return [distribute_tensor(g, mesh, placements) for g in _values(shapes, dtype, 1000 + step, GRAD_SCALE)]

    notes = notes + ["DTensor params stay where they are: the 4 large shards are bucketed (one full bucket of 4), "
                     "the 3 small ones are staged (copied into the flat buffer around the flat update)"]
    return Setup(params, grads, notes=notes)


def fsdp2_shard0_layout(dtype: torch.dtype) -> Setup:
    """FSDP2-style params: DTensors ``Shard(0)`` on a 1-D mesh named ``dp_shard``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
    return _dtensor_setup(dtype, mesh, [Shard(0)], notes=[
        "params: DTensors with placements (Shard(dim=0),) on a 1-D DeviceMesh ('dp_shard',) of size 1",
    ])


def tp_replicate_shard_layout(dtype: torch.dtype) -> Setup:
    """TP params of an HSDP-style 2-D mesh: ``Replicate()`` over ``dp_replicate``, ``Shard(0)`` over ``tp``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp_replicate", "tp"))
    return _dtensor_setup(dtype, mesh, [Replicate(), Shard(0)], notes=[
        "params: DTensors with placements (Replicate(), Shard(dim=0)) on a 2-D DeviceMesh ('dp_replicate', 'tp') "
        "of shape (1, 1); the norm is reduced over 'tp' only (a Replicate dim holds copies, not parts)",
    ])


def fp8_amax_layout(dtype: torch.dtype) -> Setup:
    """FSDP2 ``Shard(0)`` params whose 4 large weights are FP8 weights (``fp8_weights=``): their update
    also returns max|w| of the stored values, MAX-reduced over the shards for the FP8 scales."""
    setup = fsdp2_shard0_layout(dtype)
    setup.fused_kwargs = dict(fp8_weights=setup.params[:N_LARGE])
    setup.notes.append("fp8_weights: the 4 large params (FP8 weights are always bucketed and form their own sharding "
                       "group: group 0; the 3 small params form group 1, staged), fp8_dtype=torch.float8_e4m3fn")
    return setup


class _Experts(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.experts = torch.nn.ParameterList(params)


def ep_experts_layout(dtype: torch.dtype) -> Setup:
    """Expert params: DTensors ``Shard(0)`` on the MoE mesh's ``ep`` axis, with the seed's EP and PP
    scaling (``num_label_tokens``/``dp_group_size``) and a pipeline axis reduced over last."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    moe_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    pp_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))
    setup = _dtensor_setup(dtype, moe_mesh, [Shard(0)], notes=[
        "params: expert DTensors with placements (Shard(dim=0),) on the MoE DeviceMesh ('ep',) of size 1 "
        "(recognised as experts by the ep axis)",
        "device_mesh ('pp',) of size 1 with pp_axis_name='pp': PP scaling and a last reduction over 'pp'",
        "step(num_label_tokens=4096, dp_group_size=1): grads x 1/(4096/1) (PP), experts also x 1/ep_ratio "
        "(ep_ratio = dp_group_size / ep_shard_size x expert_tp_replication_factor = 1); the factor is the group's "
        "scale, folded into Phase A and the finish (no extra pass)",
    ])
    setup.fused_kwargs = dict(model_parts=[_Experts(setup.params)], device_mesh=pp_mesh, pp_axis_name="pp",
                              moe_mesh=moe_mesh, ep_axis_name="ep")
    setup.step_kwargs = dict(num_label_tokens=4096, dp_group_size=1)
    return setup


@dataclass(frozen=True)
class Reference:
    """One reference configuration: a file ``graphs/<name>.txt``.

    To add one, append a ``Reference`` to ``REFERENCES``, run ``python -m compiled_step graphs`` and
    commit the new file. ``family``: configurations of one family share compiled graphs, so they must
    have the same buffer sizes (the capture checks it and raises otherwise); give a configuration
    with other sizes a family of its own.
    """

    name: str
    title: str
    optimizer: type
    optimizer_kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: torch.dtype = torch.float32
    max_grad_norm: float | None = 1.0
    norm_type: float = 2.0
    layout: Callable[[torch.dtype], Setup] = plain_layout
    distributed: bool = False  # needs the one-process gloo world
    family: str = "plain"

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return self.optimizer(params, **dict(self.optimizer_kwargs))

    def describe_optimizer(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.optimizer_kwargs)
        return f"torch.optim.{self.optimizer.__name__}({args})"


_ADAMW = (("lr", 1e-3), ("weight_decay", 0.1))

REFERENCES: tuple[Reference, ...] = (
    Reference("adamw_fp32", "AdamW, fp32, clipped (the reference configuration)", torch.optim.AdamW, _ADAMW),
    Reference("adamw_bf16", "AdamW with bf16 params, grads and state", torch.optim.AdamW, _ADAMW,
              dtype=torch.bfloat16),
    Reference("adam_amsgrad", "Adam with amsgrad", torch.optim.Adam,
              (("lr", 1e-3), ("weight_decay", 0.01), ("amsgrad", True))),
    Reference("sgd_nesterov", "SGD with nesterov momentum", torch.optim.SGD,
              (("lr", 1e-2), ("momentum", 0.9), ("nesterov", True), ("weight_decay", 1e-4))),
    Reference("adamw_fp32_unclipped", "AdamW, fp32, not clipped (max_grad_norm=None)", torch.optim.AdamW, _ADAMW,
              max_grad_norm=None),
    Reference("fsdp2_shard0", "AdamW, fp32, an FSDP2 Shard(0) sharding group", torch.optim.AdamW, _ADAMW,
              layout=fsdp2_shard0_layout, distributed=True, family="dtensor"),
    Reference("tp_replicate_shard", "AdamW, fp32, a TP Replicate + Shard sharding group", torch.optim.AdamW, _ADAMW,
              layout=tp_replicate_shard_layout, distributed=True, family="dtensor"),
    Reference("ep_experts", "AdamW, fp32, an expert sharding group with EP scaling (and PP)", torch.optim.AdamW,
              _ADAMW, layout=ep_experts_layout, distributed=True, family="dtensor"),
    Reference("fp8_amax", "AdamW, fp32, FSDP2 Shard(0), FP8 weights: amax of the new weights inside the update",
              torch.optim.AdamW, _ADAMW, layout=fp8_amax_layout, distributed=True, family="fp8"),
)


# ---------------------------------------------------------------------------------------------
# Recording backend
# ---------------------------------------------------------------------------------------------


@dataclass
class InputInfo:
    name: str  # list name ("grads") or argument name ("table")
    count: int  # list length, or 1
    dtype: str
    shape: str  # symbolic ("n": a size symbol per list element)
    written: bool
    sizes: list[tuple[int, ...]] = field(default_factory=list)  # concrete shapes at compile time
    symbolic: bool = False  # the shape has a size symbol


@dataclass
class CompiledGraph:
    """What Dynamo and Inductor made of one graph."""

    index: int  # position in CaptureSession.graphs
    family: str
    dynamo_code: str  # GraphModule.print_readable(), raw
    post_grad_code: str  # the post_grad_graphs log text, raw (colours stripped)
    output_code: str  # Inductor's generated module (machine specific: not in the goldens)
    kernels: int  # metrics.generated_kernel_count delta
    bytes_accessed: int  # metrics.num_bytes_accessed delta (at the compile-time sizes)
    nodes: list[tuple[int, int]]  # per Inductor scheduler node: (fused ops, bytes)
    inputs: list[InputInfo]
    outputs: list[str]
    elements: int  # elements of the grad input(s) at compile time (the bytes-per-element divisor)
    shapes: tuple  # the tensor inputs' shapes at compile time (checked against each configuration's first call)
    function: str = "?"  # the pure function, from the first program call that ran it ("rules.adam.update_flat")
    constants: str = ""  # that call's keyword arguments (graph constants), rendered


class GraphCall:
    """What the recording backend returns to Dynamo: runs Inductor's compiled graph and carries the
    graph's record (``FusedStep.program.calls[i].compiled`` is this object once the call ran)."""

    def __init__(self, compiled: Callable, graph: CompiledGraph, session: CaptureSession):
        self.compiled = compiled
        self.graph = graph
        self.session = session

    @property
    def graph_index(self) -> int:
        return self.graph.index

    def __call__(self, *args):
        first = self.session.first_calls
        if first is not None and self.graph.index not in first:
            first[self.graph.index] = _tensor_shapes(args)
        return self.compiled(*args)


def _tensor_shapes(values) -> tuple:
    return tuple(tuple(int(s) for s in v.shape) for v in values if isinstance(v, torch.Tensor))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _LogGrab(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _inductor_logs():
    """Route Inductor's ``post_grad_graphs`` artifact log to us (not to stderr) and switch on its
    ``inductor_metrics`` log, without which ``metrics.num_bytes_accessed`` stays 0 (torch 2.13
    computes ``graph.count_bytes()`` only when that logger is enabled for INFO)."""
    from torch._inductor import compile_fx as cfx

    grab = _LogGrab()
    saved = []
    for logger, level in ((cfx.post_grad_graphs_log, logging.DEBUG), (cfx.inductor_metrics_log, logging.INFO)):
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.propagate = False
    cfx.post_grad_graphs_log.addHandler(grab)
    try:
        yield grab
    finally:
        cfx.post_grad_graphs_log.removeHandler(grab)
        for logger, level, propagate in saved:
            logger.setLevel(level)
            logger.propagate = propagate


@contextlib.contextmanager
def _no_compile_caches():
    """A cache hit skips Inductor's lowering, and with it the post-grad log and the byte count."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False), functorch_config.patch(
        enable_autograd_cache=False, enable_remote_autograd_cache=False
    ):
        yield


class RecordingBackend:
    """A ``torch.compile`` backend: records each graph, compiles it with Inductor, and returns a
    ``GraphCall`` carrying the record. One per family: Dynamo keys its cache entries on the backend."""

    def __init__(self, session: CaptureSession, family: str):
        self.session = session
        self.family = family

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor import metrics
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.graph import GraphLowering

        dynamo_code = gm.print_readable(print_output=False)
        inputs, outputs, elements = _graph_signature(gm, example_inputs)
        codes: list[str] = []
        kernels0, bytes0, nodes0 = metrics.generated_kernel_count, metrics.num_bytes_accessed, len(metrics.nodes_num_elem)
        # GraphLowering.save_output_code is torch's own hook for tests (run_and_get_code patches it too).
        saved_hook = GraphLowering.save_output_code
        GraphLowering.save_output_code = codes.append
        try:
            with _inductor_logs() as grab, _no_compile_caches():
                compiled = compile_fx(gm, example_inputs)
        finally:
            GraphLowering.save_output_code = saved_hook
        nodes = [(len(node.get_nodes()), node.get_read_write_buffers_sizes()) for node, _ in metrics.nodes_num_elem[nodes0:]]
        graph = CompiledGraph(
            index=len(self.session.graphs),
            family=self.family,
            dynamo_code=dynamo_code,
            post_grad_code=_ANSI.sub("", grab.messages[-1]) if grab.messages else "(no post-grad graph was logged)",
            output_code=codes[-1] if codes else "",
            kernels=metrics.generated_kernel_count - kernels0,
            bytes_accessed=metrics.num_bytes_accessed - bytes0,
            nodes=nodes,
            inputs=inputs,
            outputs=outputs,
            elements=elements,
            shapes=_tensor_shapes(example_inputs),
        )
        self.session.graphs.append(graph)
        return GraphCall(compiled, graph, self.session)


_LIST_ARG = re.compile(r"^L_(?P<name>[A-Za-z_]+?)_(?P<index>\d+)_$")
_PLAIN_ARG = re.compile(r"^(?P<scope>[LG])_(?P<name>.+)_$")  # L_: an argument; G_: a module global


def _abbr(dtype) -> str:
    return getattr(dtype, "abbr", None) or str(dtype).replace("torch.", "")


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul"}


def _is_inplace(node: torch.fx.Node) -> bool:
    """A Dynamo graph node that writes into its first argument (``x.copy_(...)``, ``x += y``)."""
    if not node.args:
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return name in _INPLACE_OPERATORS  # operator.and_ is not in place
        return name.endswith("_") and not name.startswith("__")
    return False


def _graph_signature(gm: torch.fx.GraphModule, example_inputs) -> tuple[list[InputInfo], list[str], int]:
    """Inputs (grouped by list argument), outputs, and the grad elements at compile time of a Dynamo
    graph. ``example_inputs`` are the real tensors of the compiling call, in placeholder order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {node.args[0].name for node in gm.graph.nodes
               if _is_inplace(node) and getattr(node.args[0], "op", None) == "placeholder"}
    inputs: list[InputInfo] = []
    by_name: dict[str, InputInfo] = {}
    elements = 0
    for node, example in zip(placeholders, example_inputs):
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor):
            continue  # a size symbol
        source = str(node.target)
        list_match = _LIST_ARG.match(source)
        match = list_match or _PLAIN_ARG.match(source)
        name = match.group("name") if match else source
        if not list_match and match and match.group("scope") == "G":
            name += " (global)"  # a float constant Dynamo passes as a 0-d tensor input
        if name in ("grads", "grad") and isinstance(example, torch.Tensor):
            elements += example.numel()
        shape = "[" + ", ".join("n" if list_match and not isinstance(s, int) else str(s) for s in value.shape) + "]"
        info = by_name.get(name)
        if info is None:
            info = by_name[name] = InputInfo(name, 0, _abbr(value.dtype), shape, False)
            inputs.append(info)
        info.count += 1
        info.written = info.written or node.name in written
        info.symbolic = info.symbolic or any(not isinstance(s, int) for s in value.shape)
        if isinstance(example, torch.Tensor):
            info.sizes.append(tuple(int(s) for s in example.shape))
    outputs = []
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    results = output_node.args[0] if isinstance(output_node.args[0], (tuple, list)) else (output_node.args[0],)
    for arg in results:
        value = getattr(arg, "meta", {}).get("example_value")
        if isinstance(value, torch.Tensor):
            outputs.append(f"{_abbr(value.dtype)}[{', '.join(str(s) for s in value.shape)}]")
    return inputs, outputs, elements


# ---------------------------------------------------------------------------------------------
# Capture session
# ---------------------------------------------------------------------------------------------


class CaptureSession:
    """The recorded graphs of a process, and one recording backend per family (configurations of a
    family share their graphs: Dynamo reuses a cache entry for the same backend)."""

    def __init__(self):
        self.graphs: list[CompiledGraph] = []
        self.backends: dict[str, RecordingBackend] = {}
        self.first_calls: dict[int, tuple] | None = None  # during a capture: graph index -> first call's shapes

    def backend(self, family: str) -> RecordingBackend:
        if family not in self.backends:
            self.backends[family] = RecordingBackend(self, family)
        return self.backends[family]


_SESSION: CaptureSession | None = None


def session() -> CaptureSession:
    """The process-wide session of the reference configurations, whose graphs they share."""
    global _SESSION
    if _SESSION is None:
        _SESSION = CaptureSession()
    return _SESSION


@contextlib.contextmanager
def single_rank_world():
    """A one-process gloo world (rank 0 of 1, in-memory store), unless one is already up."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("reference configurations are captured in a one-rank world; this process group "
                               f"has {dist.get_world_size()} ranks")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------


def _phase(function: str) -> str:
    if function.startswith("norm.partials."):
        return "Phase A"
    if function.startswith("norm.finish."):
        return "finish"
    if function.startswith("rules."):
        return "Phase B"
    return "compiled"


def _constant(value) -> str:
    if inspect.ismodule(value):
        return value.__name__.removeprefix("compiled_step.")
    return repr(value)


@dataclass
class Event:
    """One call of ``fused.program.calls`` as step 1 ran it."""

    kind: str  # "compiled", "eager", "collective" (Call.kind), or "break", "not run"
    text: str  # the call's label (or what stopped the capture)
    graph: int | None = None  # compiled calls: index into Capture.graphs


@dataclass
class BytesPerParam:
    value: float
    phase_a: int  # index into Capture.graphs
    update: int  # index into Capture.graphs
    update_kind: str  # "flat update" or "bucket update"
    elements: int  # grad elements the update processes (the divisor)
    group: int  # the sharding group of the large params


@dataclass
class Capture:
    """Everything a file is rendered from."""

    name: str
    header: list[str]
    graphs: list[CompiledGraph]  # in order of first use in step 1
    events: list[Event]  # step 1, in order
    plan_lines: list[str]
    graph_breaks: list[str]
    recompiles_step2: int | None  # None: step 2 did not run (a graph break stopped the capture)
    bytes_per_param: BytesPerParam | None
    bytes_per_param_note: str = ""  # why it is n/a
    generated_by: list[str] = field(default_factory=list)  # header lines after the first
    plan: Any = None  # fused.plan after step 1 (not rendered beyond plan_lines)


def _plan_lines(plan) -> list[str]:
    """``plan.describe()``, with where each group's params live under each group's line."""
    described = plan.describe()
    lines = []
    for i, group in enumerate(plan.groups):
        lines.append(described[i])
        flat = [group.entries[j] for j in group.flat]
        bucketed = [group.entries[j] for j in group.bucketed]
        regions = {r: sum(e.region == r for e in flat) for r in (planning.ALIASED, planning.STAGED)}
        flat_text = (f"flat region: {len(flat)} params ({', '.join(f'{n} {r}' for r, n in regions.items() if n)}) "
                     f"in {group.flat_rows} rows of {planning.ROW} (one flat update)" if flat else "flat region: none")
        bucket_text = (f"bucketed: {len(bucketed)} params in {group.rows - group.flat_rows} rows, {group.bucket_count} "
                       f"bucket(s) of {plan.bucket_size} (one bucket update each)" if bucketed else "bucketed: none")
        padding = group.rows * planning.ROW - sum(e.numel for e in group.entries)
        lines.append(f"  {flat_text}; {bucket_text}; {padding:,} padding elements (each param starts a row)")
    lines += described[len(plan.groups):]
    return lines


def _break_reason(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _normalize_text(f"{type(error).__name__}: {first}")


def _sizes_text(numels: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for n in numels:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ", ".join(f"{n:,}" + (f" x{k}" if k > 1 else "") for n, k in runs)


_GENERATED_BY = [
    f"# Generated by `python -m compiled_step graphs` (compiled_step/cli/graphs/) with torch {GOLDEN_TORCH_VERSION} "
    "on CPU. Do not edit:",
    "# regenerate with `python -m compiled_step graphs` or `EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graphs.py`.",
]

_BPP_DEFINITION = (
    "bytes per parameter: (bytes accessed by the Phase A graph + by the update graph of the large params: the flat "
    "update for plain tensors, the bucket update for DTensor and FP8 layouts) / (the grad elements that update "
    "processes, padding included). fp32 AdamW's floor is 32: read p, g, m, v and write p, m, v once (28), plus one "
    "more read of g for the norm (4)"
)


def _nth(calls, function_suffix: str, n: int):
    matching = [c for c in calls if c.kind == "compiled" and c.function.endswith(function_suffix)]
    return matching[n] if n < len(matching) else None


def _bytes_per_param(plan, program, local: dict[int, int]) -> tuple[BytesPerParam | None, str]:
    """The large params' group, its Phase A call and the update call of the large params (by the
    program's documented order: one Phase A call per group with rows, one flat update per group with a
    flat region, one bucket update per bucket), and both graphs' bytes at that group's sizes."""
    entries = [(g, e) for g, group in enumerate(plan.groups) for e in group.entries]
    if not entries:
        return None, "no params"
    g, large = max(entries, key=lambda ge: ge[1].numel)  # the first of the largest
    group = plan.groups[g]
    phase_a = _nth(program.calls, ".partial_of_buffer", sum(1 for k in range(g) if plan.groups[k].rows))
    if large.region == planning.BUCKETED:
        kind = "bucket update"
        b = group.bucketed.index(large.index) // plan.bucket_size
        members = group.bucketed[b * plan.bucket_size:(b + 1) * plan.bucket_size]
        expected = sum(group.entries[i].numel for i in members) + (plan.bucket_size - len(members))  # 1-element fillers
        update = _nth(program.calls, ".update_bucket", sum(plan.groups[k].bucket_count for k in range(g)) + b)
    else:
        kind = "flat update"
        expected = group.flat_rows * planning.ROW
        update = _nth(program.calls, ".update_flat", sum(1 for k in range(g) if plan.groups[k].flat_slots))
    calls = (phase_a, update)
    if any(c is None or not isinstance(c.compiled, GraphCall) for c in calls):
        return None, "n/a (the step did not run both graphs)"
    a, u = (c.compiled.graph for c in calls)
    if a.elements != group.rows * planning.ROW or u.elements != expected:
        return None, "n/a (a graph was compiled at another group's sizes)"
    value = (a.bytes_accessed + u.bytes_accessed) / u.elements
    return BytesPerParam(value, local[a.index], local[u.index], kind, u.elements, g), ""


def capture(ref: Reference, sess: CaptureSession | None = None, *, bucket_size: int = REFERENCE_BUCKET_SIZE,
            setup: Setup | None = None, extra_header: Sequence[str] = (),
            generated_by: Sequence[str] | None = None) -> Capture:
    """Run two FusedStep steps of ``ref`` with the recording backend and collect what to render."""
    import torch._dynamo.config as dynamo_config

    from compiled_step import FusedStep

    sess = sess or session()
    setup = setup or ref.layout(ref.dtype)
    optimizer = ref.make_optimizer(setup.params)
    options = dict(max_grad_norm=ref.max_grad_norm, norm_type=ref.norm_type, bucket_size=bucket_size,
                   backend=sess.backend(ref.family), compile_notice=False, cuda_graphs=False)
    options.update(setup.fused_kwargs)
    fused = FusedStep(optimizer, **options)

    def set_grads(step):
        for p, g in zip(setup.params, setup.grads(step)):
            p.grad = g

    counters = torch._dynamo.utils.counters
    breaks_before = sum(counters["graph_break"].values())
    breaks: list[str] = []
    recompiles = None
    compiled_before = len(sess.graphs)
    sess.first_calls = {}
    try:
        # Dynamo's local profile-guided decisions must not carry over from an earlier process.
        with dynamo_config.patch(automatic_dynamic_local_pgo=False):
            set_grads(0)
            try:
                fused.step(**setup.step_kwargs)
            except torch._dynamo.exc.Unsupported as error:  # fullgraph=True turns a graph break into this
                breaks.append(_break_reason(error))
            first_calls = dict(sess.first_calls)
            compiled_in_step1 = list(range(compiled_before, len(sess.graphs)))
            if not breaks:
                # A second step as an LR scheduler would make it: new lr and grads, step counts advanced.
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * 0.5
                set_grads(1)
                before = len(sess.graphs)
                fused.step(**setup.step_kwargs)
                recompiles = len(sess.graphs) - before
    finally:
        sess.first_calls = None
    counted = sum(counters["graph_break"].values()) - breaks_before
    if counted and not breaks:
        breaks.append(f"{counted} graph break(s) counted by Dynamo")

    program, plan = fused.program, fused.plan
    local: dict[int, int] = {}  # session graph index -> index into Capture.graphs (order of first use)
    events: list[Event] = []
    for call in program.calls if program is not None else []:
        if call.kind != "compiled":
            events.append(Event(call.kind, call.label))
            continue
        ran = call.compiled
        if ran is None:
            if breaks:
                events.append(Event("break", f"graph break, capture stopped: {breaks[0]}"))
                break
            events.append(Event("not run", call.label))
            continue
        if not isinstance(ran, GraphCall):
            raise RuntimeError(f"compiled_step.cli.graphs: {call.label!r} ran a callable the recording backend did not "
                               f"return ({type(ran).__name__})")
        graph = ran.graph
        if graph.function == "?":
            graph.function = call.function
            graph.constants = ", ".join(f"{k}={_constant(v)}" for k, v in call.kwargs.items())
        events.append(Event("compiled", call.label, local.setdefault(graph.index, len(local))))
    for index in compiled_in_step1:  # compiled in step 1 but run by no call (a recompile): listed too
        local.setdefault(index, len(local))
    for index in local:
        graph, got = sess.graphs[index], first_calls.get(index)
        if got is not None and got != graph.shapes:
            raise RuntimeError(
                f"compiled_step.cli.graphs: {ref.name} first calls graph {local[index] + 1} ({graph.function}) with "
                f"tensors of shapes {list(got)}, but it was compiled (family {graph.family!r}) at "
                f"{list(graph.shapes)}: "
                f"its byte counts would not be this configuration's. Give {ref.name} a family of its own "
                "(Reference.family) or the sizes of its family.")

    if plan is None or program is None:
        bpp, bpp_note = None, "n/a (no plan)"
    else:
        bpp, bpp_note = _bytes_per_param(plan, program, local)
    numels = [planning.local_tensor(p).numel() for p in setup.params]
    header = [
        f"optimizer: {ref.describe_optimizer()}; params {str(ref.dtype).replace('torch.', '')}",
        f"FusedStep(max_grad_norm={ref.max_grad_norm!r}, norm_type={ref.norm_type!r}, bucket_size={bucket_size}, "
        f"pack_threshold={fused.config.pack_threshold}, flat_params={fused.config.flat_params}, "
        "backend=<recording backend, then inductor>)",
        *setup.notes,
        *(["world: one process, gloo, rank 0 of 1 (in-memory store): the meshes have size 1, but the DTensors, "
           "the plan and its reductions are real and every collective below is a real all_reduce"]
          if ref.distributed else []),
        *extra_header,
        f"tensor sizes (local elements): {_sizes_text(numels)}; each graph is compiled at its first call, whose tensor "
        f"sizes are the same in every configuration of family {ref.family!r} that shares it (checked), so byte counts "
        "are for these sizes",
        _BPP_DEFINITION,
    ]
    return Capture(
        name=ref.name,
        header=header,
        graphs=[sess.graphs[i] for i in sorted(local, key=local.get)],
        events=events,
        plan_lines=_plan_lines(plan) if plan is not None else ["(no plan: the step stopped before planning)"],
        graph_breaks=breaks,
        recompiles_step2=recompiles,
        bytes_per_param=bpp,
        bytes_per_param_note=bpp_note,
        generated_by=list(generated_by) if generated_by is not None else [
            line.replace(GOLDEN_TORCH_VERSION, torch.__version__.split("+")[0], 1) for line in _GENERATED_BY],
        plan=plan,
    )


def capture_references(names: Sequence[str] | None = None, sess: CaptureSession | None = None) -> dict[str, Capture]:
    """Capture the reference configurations (all, or those named), in ``REFERENCES`` order."""
    known = {r.name: r for r in REFERENCES}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown reference configuration(s) {unknown}; known: {list(known)}")
    selected = [r for r in REFERENCES if names is None or r.name in names]
    sess = sess or session()
    out: dict[str, Capture] = {}
    for ref in [r for r in selected if not r.distributed]:
        out[ref.name] = capture(ref, sess)
    distributed = [r for r in selected if r.distributed]
    if distributed:
        with single_rank_world():
            for ref in distributed:
                out[ref.name] = capture(ref, sess)
    return {r.name: out[r.name] for r in selected}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_FILE_COMMENT = re.compile(r"# File: (?P<path>\S+?):\d+ in (?P<fn>[^,]+), code: (?P<code>.*)")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_TMP_PATH = re.compile(r"/tmp/[^\s'\"]*")
_HASHED_KERNEL = re.compile(r"\b((?:cpp|triton)_\w+?)_[0-9a-f]{16,}\b")
_EVAL_KEY = re.compile(r"<eval_with_key>\.\d+")


def _relative_source(path: str) -> str:
    marker = "compiled_step/"
    return path[path.rindex(marker):] if marker in path else os.path.basename(path)


def _normalize_text(text: str) -> str:
    text = _ANSI.sub("", text)
    text = _ADDRESS.sub("0x...", text)
    text = _TMP_PATH.sub("<tmp>", text)
    text = _HASHED_KERNEL.sub(r"\1_<hash>", text)
    text = _EVAL_KEY.sub("<eval_with_key>", text)
    return _REPO_ROOT_RE.sub("", text)


_REPO_ROOT_RE = re.compile(re.escape(str(_REPO_ROOT) + os.sep))


def normalize_graph_code(code: str, *, keep_source: bool = False) -> str:
    """A graph's code without machine- or edit-specific text.

    ``keep_source=False`` (the goldens) strips every comment, as ``normalize_gm`` does, so editing a
    rule's source without changing its graph leaves the files alone. ``keep_source=True`` keeps each
    op's source line, without path prefix or line number (for run dumps meant to be read).
    """
    from torch._dynamo.testing import normalize_gm

    code = _ANSI.sub("", code)
    start = code.find("class ")
    code = code[start:] if start >= 0 else code
    if keep_source:
        code = _FILE_COMMENT.sub(lambda m: f"# {_relative_source(m['path'])} in {m['fn']}: {m['code']}", code)
        code = "\n".join(line.rstrip() for line in code.splitlines())
        code = re.sub(r"\n{3,}", "\n\n", code)
    else:
        code = normalize_gm(code)
    return _normalize_text(code).strip("\n") + "\n"


def _per_phase(cap: Capture) -> dict[str, int]:
    per_phase: dict[str, int] = {}
    for g in cap.graphs:
        per_phase[_phase(g.function)] = per_phase.get(_phase(g.function), 0) + 1
    return per_phase


def _bpp_text(cap: Capture) -> str:
    bpp = cap.bytes_per_param
    if bpp is None:
        return cap.bytes_per_param_note or "n/a"
    return f"{bpp.value:.2f}"


def summary_numbers(cap: Capture) -> str:
    """The headline numbers of a capture in one line (pinned inline by the tests)."""
    bpp = cap.bytes_per_param
    return (
        f"graphs={len(cap.graphs)} ({', '.join(f'{k}: {v}' for k, v in _per_phase(cap).items())}) "
        f"recompiles_step2={cap.recompiles_step2} graph_breaks={len(cap.graph_breaks)} "
        f"kernels={[g.kernels for g in cap.graphs]} bytes_per_param={'n/a' if bpp is None else f'{bpp.value:.2f}'}"
    )


def _schedule_lines(cap: Capture) -> list[str]:
    rows: list[tuple[str, str]] = []
    for event in cap.events:
        if event.kind == "compiled":
            g = cap.graphs[event.graph]
            rows.append((_phase(g.function), f"{event.text}  [graph {event.graph + 1}: {g.function}]"))
        elif event.kind == "break":
            rows.append(("ERROR", event.text))
        elif event.kind == "not run":
            rows.append(("compiled", f"{event.text}  (not run)"))
        else:
            rows.append((event.kind, event.text))
    lines, i = [], 0
    while i < len(rows):  # consecutive identical rows are folded
        j = i
        while j < len(rows) and rows[j] == rows[i]:
            j += 1
        where, what = rows[i]
        lines.append(f"{len(lines) + 1:2d}. {where:<10} {what}" + (f" (x{j - i})" if j - i > 1 else ""))
        i = j
    if not any(e.kind == "collective" for e in cap.events) and not cap.graph_breaks:
        lines.append("    (no collective: plan.reductions is empty and plan.pp is None)")
    return lines


def _concrete(info: InputInfo) -> str:
    if not info.symbolic or not info.sizes:
        return ""
    shapes = [" x ".join(str(s) for s in shape) or "scalar" for shape in info.sizes]
    if len(shapes) > 1:
        return f"  ({'each ' + shapes[0] if len(set(shapes)) == 1 else ', '.join(shapes)} at compile time)"
    return f"  ({shapes[0]} at compile time)"


def _inputs_lines(g: CompiledGraph) -> list[str]:
    width = max((len(i.name) for i in g.inputs), default=0)
    lines = []
    for info in g.inputs:
        count = f"{info.count} x " if info.count > 1 else ""
        access = "read, written in place" if info.written else "read"
        lines.append(f"  {info.name:<{width}}  {count}{info.dtype}{info.shape}  {access}{_concrete(info)}")
    return lines


def _nodes_line(g: CompiledGraph) -> str:
    groups: dict[tuple[int, int], int] = {}
    for node in g.nodes:
        groups[node] = groups.get(node, 0) + 1
    parts = [f"{n} x ({ops} op{'s' if ops != 1 else ''}, {b:,} B)" for (ops, b), n in groups.items()]
    return f"Inductor scheduler nodes: {len(g.nodes)}: " + ", ".join(parts)


def _per_element(num: int, den: int) -> str:
    return f"{num / den:.2f}" if den else "n/a"


def render(cap: Capture, *, keep_source: bool = False) -> str:
    """The text of one graph file."""
    out = [
        f"{HEADER_MARK}: {cap.name}",
        *cap.generated_by,
        "#",
        *[f"# {line}" for line in cap.header],
        "",
        "== Summary ==",
        f"graphs compiled: {len(cap.graphs)} (" + ", ".join(f"{k}: {v}" for k, v in _per_phase(cap).items()) + ")",
    ]
    if cap.recompiles_step2 is not None:
        out.append(f"graphs compiled by step 2 (lr halved, new grads): {cap.recompiles_step2}")
    out.append(f"graph breaks: {len(cap.graph_breaks)}" + (" (fullgraph=True)" if not cap.graph_breaks else ""))
    out += [f"  - {reason}" for reason in cap.graph_breaks]
    total_kernels = sum(g.kernels for g in cap.graphs)
    out.append(f"kernels (Inductor's generated_kernel_count): {total_kernels} = "
               + " + ".join(f"{g.kernels} (graph {i + 1})" for i, g in enumerate(cap.graphs)))
    out.append("bytes accessed (Inductor's num_bytes_accessed, at compile-time sizes):")
    for i, g in enumerate(cap.graphs):
        per = (f"for {g.elements:,} grad elements = {_per_element(g.bytes_accessed, g.elements)} B/element"
               if g.elements else "(no grad input)")
        out.append(f"  graph {i + 1} {_phase(g.function)} {g.function}: {g.bytes_accessed:,} B {per}")
    bpp = cap.bytes_per_param
    if bpp is None:
        out.append(f"bytes per parameter: {_bpp_text(cap)}")
    else:
        out.append(f"bytes per parameter (graph {bpp.phase_a + 1} Phase A + graph {bpp.update + 1} {bpp.update_kind} "
                   f"of the large params, group {bpp.group}, over its {bpp.elements:,} grad elements): {bpp.value:.2f}")
    out += ["", "== Sharding groups and reductions (the plan) ==", *cap.plan_lines]
    out += ["", "== Where the collectives sit (step 1, fused.program.calls in the order it ran) ==",
            *_schedule_lines(cap)]
    for i, g in enumerate(cap.graphs):
        labels = [e.text for e in cap.events if e.kind == "compiled" and e.graph == i]
        out += [
            "",
            f"== Graph {i + 1}: {_phase(g.function)}, {g.function} ==",
            f"graph constants (the call's keyword arguments): {g.constants or 'none'}",
            f"calls in step 1: {len(labels)}" + (f" ({'; '.join(labels)})" if labels else ""),
            "inputs (n: a symbolic size per list element; sizes at compile time in parentheses):",
            *_inputs_lines(g),
            "outputs: " + (", ".join(g.outputs) if g.outputs else "none (results are written into the inputs in place)"),
            f"kernels: {g.kernels}; bytes accessed: {g.bytes_accessed:,}",
            _nodes_line(g),
            "",
            "-- Dynamo FX graph --",
            normalize_graph_code(g.dynamo_code, keep_source=keep_source).rstrip("\n"),
            "",
            "-- Post-grad ATen graph (Inductor) --",
            normalize_graph_code(g.post_grad_code, keep_source=keep_source).rstrip("\n"),
        ]
    return "\n".join(out) + "\n"


def render_references(names: Sequence[str] | None = None, sess: CaptureSession | None = None) -> dict[str, str]:
    """``{file name: text}`` for the reference configurations."""
    return {f"{name}.txt": render(cap) for name, cap in capture_references(names, sess).items()}


# ---------------------------------------------------------------------------------------------
# Compare / write
# ---------------------------------------------------------------------------------------------


@dataclass
class Mismatch:
    file: str
    kind: str  # "changed", "missing" (no golden), "extra" (golden without a configuration)
    diff: str

    def __str__(self):
        return f"{self.file}: {self.kind}\n{self.diff}"


def _dump_files(directory: Path) -> dict[str, str]:
    files = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.txt")):
            text = path.read_text()
            if text.startswith(HEADER_MARK):
                files[path.name] = text
    return files


def compare(rendered: dict[str, str], directory: Path, *, complete: bool = True) -> list[Mismatch]:
    """Differences between freshly rendered files and ``directory`` (nothing is written).

    ``complete``: ``rendered`` holds every configuration, so a dump file without one is reported.
    """
    existing = _dump_files(Path(directory))
    mismatches = []
    for name, text in rendered.items():
        old = existing.get(name)
        if old is None:
            mismatches.append(Mismatch(name, "missing", f"(no {name} in {directory})"))
        elif old != text:
            diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                f"{directory}/{name} (committed)", f"{name} (this torch and code)"))
            mismatches.append(Mismatch(name, "changed", diff))
    if complete:
        for name in sorted(set(existing) - set(rendered)):
            mismatches.append(Mismatch(name, "extra", f"({name} matches no reference configuration)"))
    return mismatches


def write(rendered: dict[str, str], directory: Path, *, prune: bool = True) -> list[Path]:
    """Write the files; with ``prune``, remove dump files of configurations that no longer exist."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if prune:
        for name in set(_dump_files(directory)) - set(rendered):
            (directory / name).unlink()
    paths = []
    for name, text in rendered.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# A run's graphs (the demo)
# ---------------------------------------------------------------------------------------------


def _synthetic_setup(sel: dict) -> Setup:
    """Plain 1-D tensors that select the graphs of one selection of a run's groups, at the sizes of the
    run's first flat region and first bucket of that selection, and the header lines saying so."""
    dtype, grad_dtype, device, fp8 = sel["dtype"], sel["grad_dtype"], sel["device"], sel["fp8"]
    flat = sel["flat"][1] if sel["flat"] else []
    bucket = sel["bucket"][1] if sel["bucket"] else []
    notes = []
    if fp8:  # FP8 weights are bucketed whatever their size (empty ones staged), as in the run
        kwargs: dict[str, Any] = {}
    elif not bucket:  # plain tensors, aliased as in the run
        kwargs = dict(flat_params=True)
    else:  # not aliased: staged up to pack_threshold, bucketed above it
        threshold = max(flat, default=0)
        if any(n <= threshold for n in bucket):
            notes.append(f"bucket sizes raised to at least {threshold + 1:,} elements so that the flat region's "
                         f"params ({threshold:,} elements at most) and the bucket's separate by pack_threshold")
            bucket = [max(n, threshold + 1) for n in bucket]
        kwargs = dict(flat_params=False, pack_threshold=threshold)
    setup = plain_layout(dtype, device, [(n,) for n in flat + bucket], grad_dtype=grad_dtype)
    if fp8:
        kwargs["fp8_weights"] = list(setup.params)
    setup.fused_kwargs = kwargs
    where = []
    if sel["flat"]:
        where.append(f"the flat region of the run's group {sel['flat'][0]} ({len(flat)} params)")
    if sel["bucket"]:
        where.append(f"the first bucket of the run's group {sel['bucket'][0]} ({len(bucket)} params)")
    setup.notes = [
        f"synthetic plain 1-D tensors of the sizes of {' and '.join(where)}, selecting the graphs of the run's groups "
        f"{sel['groups']} (hyperparameters of param group {sel['param_groups'][0]}); "
        + ("FP8 weights (fp8_weights=)" if fp8 else ", ".join(f"{k}={v}" for k, v in kwargs.items())),
        *notes,
        "the run's collectives are those of its plan and program, below (this capture runs in one process and "
        "issues none)",
    ]
    return setup


def dump_run_graphs(out_dir, fused) -> list[Path]:
    """Write the graphs of an existing FusedStep's configuration into ``out_dir/graphs/``.

    The run's compiled graphs are not recorded while it trains (it uses the ordinary Inductor
    backend), so this re-runs the capture on synthetic tensors that select the same graphs: per
    distinct (update variant, dtype, grad dtype, device, FP8) of the run's sharding groups, the run's
    optimizer class and hyperparameters, bucket size, norm type and clipping, with tensors of the
    sizes of the first flat region and the first bucket of such a group, so the flat update and the
    bucket update compile at the run's sizes. The run's own plan and program (its sharding groups
    and the collectives between the graphs) are written next to them. Nothing of the run changes:
    its params, grads and state are not touched. Also writes Inductor's generated code
    (``*.output_code.py``), which depends on the machine.

    Uses FusedStep's public API only (``plan``, ``program``, ``config``, ``optimizer``, ``rule``).
    Returns the paths written. With ``compile=False`` the run compiled nothing: the file says so.
    """
    out = Path(out_dir) / "graphs"
    out.mkdir(parents=True, exist_ok=True)
    plan, program, cfg = fused.plan, fused.program, fused.config
    run_lines = ["(the run's plan)", *(_plan_lines(plan) if plan is not None else ["none: the run never stepped"])]
    if program is not None:
        run_lines += ["(the run's program: fused.program.describe())", *program.describe()]
    if not cfg.compile or plan is None:
        why = ("This run used FusedStep(compile=False): the same functions ran eagerly, no graph was compiled."
               if not cfg.compile else "This run never stepped: no graph was compiled.")
        path = out / "run.txt"
        path.write_text("\n".join([
            f"{HEADER_MARK}: run",
            f"# {why}",
            "",
            "== Sharding groups and reductions (the run's plan) ==",
            *run_lines,
        ]) + "\n")
        return [path]

    optimizer = fused.optimizer
    accepted = set(inspect.signature(type(optimizer)).parameters) - {"params", "foreach", "fused"}
    # One capture per distinct graph selection: update variant (amsgrad, momentum), dtypes, device, FP8.
    selections: dict[tuple, dict] = {}
    for g, group in enumerate(plan.groups):
        key = group.key
        pg = optimizer.param_groups[key.param_group]
        sel = selections.setdefault(
            (fused.rule.variant(pg), key.dtype, key.grad_dtype, str(key.device), key.fp8),
            dict(pg=pg, variant=fused.rule.variant(pg), dtype=key.dtype, grad_dtype=key.grad_dtype, device=key.device,
                 fp8=key.fp8, param_groups=[], groups=[], flat=None, bucket=None))
        sel["param_groups"].append(key.param_group)
        sel["groups"].append(g)
        if sel["flat"] is None and group.flat:
            sel["flat"] = (g, [group.entries[i].numel for i in group.flat])
        if sel["bucket"] is None and group.bucketed:
            sel["bucket"] = (g, [group.entries[i].numel for i in group.bucketed[:plan.bucket_size]])
    paths = []
    run_session = CaptureSession()  # never the reference session: these graphs compile at the run's sizes
    for sel in selections.values():
        hyper = tuple((k, v) for k, v in sorted(sel["pg"].items()) if k in accepted)
        dtype_name = str(sel["dtype"]).replace("torch.", "")
        variant = sel["variant"]
        flags = [name for name, on in zip(getattr(variant, "_fields", ()), variant) if on is True]
        grads = str(sel["grad_dtype"]).replace("torch.", "")
        name = "-".join(["run", type(optimizer).__name__.lower(), dtype_name,
                         *([f"grads_{grads}"] if sel["grad_dtype"] != sel["dtype"] else []), *flags,
                         *(["fp8"] if sel["fp8"] else [])])
        ref = Reference(name, f"this run's {type(optimizer).__name__} graphs ({dtype_name})", type(optimizer), hyper,
                        dtype=sel["dtype"], max_grad_norm=cfg.max_grad_norm, norm_type=cfg.norm_type, family=name)
        setup = _synthetic_setup(sel)
        cap = capture(ref, run_session, bucket_size=cfg.bucket_size, setup=setup, generated_by=[
            "# Written by compiled_step.cli.graphs.dump_run_graphs(out_dir, fused) for one run (not a golden: source "
            "lines are kept as comments).",
        ])
        cap.plan_lines = [*run_lines, "(this capture's plan)", *cap.plan_lines]
        path = out / f"{name}.txt"
        path.write_text(render(cap, keep_source=True))
        paths.append(path)
        for i, g in enumerate(cap.graphs):
            code_path = out / f"{name}.graph{i + 1}.output_code.py"
            code_path.write_text(_normalize_text(g.output_code))
            paths.append(code_path)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compiled_step graphs",
        description="Write the compiled graphs of FusedStep's reference configurations (one file each) "
        "into graphs/ or --out DIR. Deterministic: the same command twice gives identical files.",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's graphs/)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=[r.name for r in REFERENCES],
                   help="only these configurations (default: all)")
    p.add_argument("--check", action="store_true",
                   help="compare with the folder instead of writing; exit 1 and print the diff on a difference")
    p.add_argument("--list", action="store_true", help="list the reference configurations and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for ref in REFERENCES:
            print(f"{ref.name:<22} {ref.title}")
        return 0
    out = args.out if args.out is not None else default_out_dir()
    ok, reason = goldens_apply()
    if not ok:
        print(f"note: {reason}", file=sys.stderr)
    start = time.perf_counter()
    print(f"capturing {len(args.only or REFERENCES)} reference configuration(s) (each new graph compiles cold, "
          "a few seconds on a small CPU) ...", file=sys.stderr, flush=True)
    captures = capture_references(args.only)
    rendered = {f"{name}.txt": render(cap) for name, cap in captures.items()}
    broken = [name for name, cap in captures.items() if cap.graph_breaks]
    if args.check:
        mismatches = compare(rendered, out, complete=args.only is None)
        for m in mismatches:
            print(m)
        print(f"{len(mismatches)} difference(s) against {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        return 1 if mismatches or broken else 0
    paths = write(rendered, out, prune=args.only is None)
    for path in paths:
        print(path)
    print(f"wrote {len(paths)} file(s) into {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if broken:
        print(f"graph breaks in {broken}: see the files' summaries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
