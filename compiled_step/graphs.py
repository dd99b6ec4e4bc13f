"""``python -m compiled_step graphs``: what Dynamo and Inductor made of FusedStep, as reviewable text.

For each reference configuration (``REFERENCES``) this module runs two real ``FusedStep.step()``
calls on CPU with a *recording backend* and writes one text file into ``graphs/``:

* the Dynamo FX graph of every compiled bucket function the step used, normalised (comments with
  file paths and line numbers stripped, as ``torch._dynamo.testing.normalize_gm`` does);
* the post-grad ATen graph Inductor lowered (the ``TORCH_LOGS=post_grad_graphs`` text);
* a summary: graphs compiled, graph breaks, Inductor's kernel count
  (``torch._inductor.metrics.generated_kernel_count``) and bytes accessed (``num_bytes_accessed``,
  which Inductor only computes when its ``inductor_metrics`` log is on), bytes per parameter, and
  each graph's inputs and outputs;
* where the collectives sit between the graphs: the calls of step 1 in the order they ran (Phase A
  graph calls, the eager scaling, each ``all_reduce`` with its process-group label, the eager
  norm/clip, Phase B graph calls), next to ``plan.reductions`` and ``plan.pp``.

How the capture works (the torch 2.13 APIs used are private, hence the pinned version):

* ``FusedStep(..., backend=recorder)``: the recorder is a ``torch.compile`` backend that keeps the
  ``GraphModule`` Dynamo hands over, then compiles it with Inductor's ``compile_fx`` while the
  ``post_grad_graphs`` and ``inductor_metrics`` artifact logs are routed to it, and with the FX graph
  and AOTAutograd caches off (a cache hit skips lowering, so neither log would fire). A backend
  call that raises (Dynamo restarts an analysis, e.g. when it specialises a float input) records
  nothing.
* The FusedStep's ``kernels.Compiler`` is wrapped so that every call of a compiled function is an
  event, and ``collectives._all_reduce``, ``norms.apply_scale``, ``norms.finish`` and
  ``lifecycle.fp8.fp8_scales_from_amax`` are observed the same way (and still run). Graphs are
  shared across configurations by (function, argument dtypes and structure, keyword arguments):
  Dynamo reuses its cache entry for the same backend, so AdamW fp32 plain, unclipped, FSDP2, TP and
  EP compile their graphs once.
* Distributed configurations run in a one-process gloo world (``HashStore``, rank 0 of 1) with
  real ``DeviceMesh``es of size 1 and real DTensor params, so the plan, its reductions and their
  labels are the ones a sharded run has; every collective is a real ``all_reduce`` over a group of
  one rank.

Reference bucket: ``bucket_size=4`` (the test suite's bucket, so compile time stays small; graphs
grow linearly with the bucket and FusedStep's default is 16). Each sharding group holds 4 "large"
params of 128 x 256 = 32768 elements (above the default ``pack_threshold``, so they take the bucket
path: exactly one full bucket) and 3 small ones of 256, 256 and 128 elements (packed). Every graph
is compiled at its first call, so Inductor's byte counts are for those sizes. **Bytes per
parameter** is (bytes accessed by the Phase A graph + the Phase B bucket-update graph, both at the
reference bucket) / (4 x 32768), the number comparable to the 32 B/param floor of fp32 AdamW in
DESIGN.md. The packed update's bytes per element is reported per graph.

Output is deterministic: no addresses, timestamps, hashes, cache paths or line numbers; running the
command twice gives identical files. Nothing in the files depends on the CPU: they came out
identical with 1 and 2 threads and with Inductor's vector width forced to AVX2 (``cpp.simdlen=256``)
and to scalar code (``cpp.simdlen=1``); Inductor's generated C++ does depend on it and is left out. ``tests/test_graphs.py`` regenerates every file and compares
(``EXPECTTEST_ACCEPT=1`` rewrites them), so any change to a graph shows up as a reviewed diff.

``dump_run_graphs(out_dir, fused)`` writes the same kind of file for an existing FusedStep (the
demo calls it), by re-running the capture on synthetic tensors with the run's optimizer
hyperparameters, dtypes, bucket size and norm type, plus Inductor's generated code (which depends
on the CPU's vector ISA and thread count, so it is never part of the committed goldens).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import inspect
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiled_step import collectives, kernels, norms, planning

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
N_LARGE = REFERENCE_BUCKET_SIZE  # exactly one full bucket per sharding group
SMALL_SHAPES = ((256,), (256,), (128,))  # packed: biases and norm weights
GRAD_SCALE = 3.0  # grads ~ N(0, 9): the total norm is ~1e3, so clipping at 1.0 is active

# The checkout this package lives in (for the default output folder and for stripping paths).
_REPO_ROOT = Path(__file__).resolve().parents[1]


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


def plain_layout(dtype: torch.dtype, device: str = "cpu", shapes: Sequence[tuple[int, ...]] | None = None) -> Setup:
    """Plain tensors on one device: no reductions (``plan.reductions`` is empty)."""
    shapes = list(shapes) if shapes is not None else _shapes()
    params = [torch.nn.Parameter(t.to(device)) for t in _values(shapes, dtype, seed=0)]
    return Setup(params, lambda step: [g.to(device) for g in _values(shapes, dtype, 1000 + step, GRAD_SCALE)])


def _dtensor_setup(dtype: torch.dtype, mesh, placements, **kwargs) -> Setup:
    from torch.distributed.tensor import distribute_tensor

    shapes = _shapes()
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t in _values(shapes, dtype, seed=0)]

    def grads(step):
        return [distribute_tensor(g, mesh, placements) for g in _values(shapes, dtype, 1000 + step, GRAD_SCALE)]

    return Setup(params, grads, **kwargs)


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
    setup.notes.append("fp8_weights: the 4 bucketed params (FP8 weights are never packed; they form their own "
                       "sharding group), fp8_dtype=torch.float8_e4m3fn")
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
        "(ep_ratio = dp_group_size / ep_shard_size x expert_tp_replication_factor = 1)",
    ])
    setup.fused_kwargs = dict(model_parts=[_Experts(setup.params)], device_mesh=pp_mesh, pp_axis_name="pp",
                              moe_mesh=moe_mesh, ep_axis_name="ep")
    setup.step_kwargs = dict(num_label_tokens=4096, dp_group_size=1)
    return setup


@dataclass(frozen=True)
class Reference:
    """One reference configuration: a file ``graphs/<name>.txt``.

    To add one (e.g. the FP8 amax variant once FusedStep computes amax inside the update), append a
    ``Reference`` to ``REFERENCES``, run ``python -m compiled_step graphs`` and commit the new file.
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
              layout=fsdp2_shard0_layout, distributed=True),
    Reference("tp_replicate_shard", "AdamW, fp32, a TP Replicate + Shard sharding group", torch.optim.AdamW, _ADAMW,
              layout=tp_replicate_shard_layout, distributed=True),
    Reference("ep_experts", "AdamW, fp32, an expert sharding group with EP scaling (and PP)", torch.optim.AdamW,
              _ADAMW, layout=ep_experts_layout, distributed=True),
    Reference("fp8_amax", "AdamW, fp32, FSDP2 Shard(0), FP8 weights: amax of the new weights inside the update",
              torch.optim.AdamW, _ADAMW, layout=fp8_amax_layout, distributed=True),
)


# ---------------------------------------------------------------------------------------------
# Recording backend
# ---------------------------------------------------------------------------------------------


@dataclass
class InputInfo:
    name: str  # list name ("grads") or argument name ("table")
    count: int  # list length, or 1
    dtype: str
    shape: str
    written: bool


@dataclass
class CompiledGraph:
    """What Dynamo and Inductor made of one graph."""

    function: str  # e.g. "rules.adam.update"
    dynamo_code: str  # GraphModule.print_readable(), raw
    post_grad_code: str  # the post_grad_graphs log text, raw (colours stripped)
    output_code: str  # Inductor's generated module (machine specific: not in the goldens)
    kernels: int  # metrics.generated_kernel_count delta
    bytes_accessed: int  # metrics.num_bytes_accessed delta (at the compile-time sizes)
    nodes: list[tuple[int, int]]  # per Inductor scheduler node: (fused ops, bytes)
    inputs: list[InputInfo]
    outputs: list[str]
    elements: int  # elements of the grad input(s) at compile time (the bytes-per-element divisor)


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
    """A cache hit skips Inductor's lowering, and with it the post-grad log and the byte count;
    Dynamo's local PGO profile would carry decisions from one process to the next."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False), functorch_config.patch(
        enable_autograd_cache=False, enable_remote_autograd_cache=False
    ), dynamo_config.patch(automatic_dynamic_local_pgo=False):
        yield


class RecordingBackend:
    """A ``torch.compile`` backend: records each graph, then compiles it with Inductor."""

    def __init__(self):
        self.graphs: list[CompiledGraph] = []
        self.current_function = "?"

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
        self.graphs.append(CompiledGraph(
            function=self.current_function,
            dynamo_code=dynamo_code,
            post_grad_code=_ANSI.sub("", grab.messages[-1]) if grab.messages else "(no post-grad graph was logged)",
            output_code=codes[-1] if codes else "",
            kernels=metrics.generated_kernel_count - kernels0,
            bytes_accessed=metrics.num_bytes_accessed - bytes0,
            nodes=nodes,
            inputs=inputs,
            outputs=outputs,
            elements=elements,
        ))
        return compiled


_LIST_ARG = re.compile(r"^L_(?P<name>[A-Za-z_]+?)_(?P<index>\d+)_$")
_PLAIN_ARG = re.compile(r"^L_(?P<name>.+)_$")


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
        if name in ("grads", "grad") and isinstance(example, torch.Tensor):
            elements += example.numel()
        shape = "[" + ", ".join("n" if list_match and not isinstance(s, int) else str(s) for s in value.shape) + "]"
        info = by_name.get(name)
        if info is None:
            info = by_name[name] = InputInfo(name, 0, _abbr(value.dtype), shape, False)
            inputs.append(info)
        info.count += 1
        info.written = info.written or node.name in written
    outputs = []
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    results = output_node.args[0] if isinstance(output_node.args[0], (tuple, list)) else (output_node.args[0],)
    for arg in results:
        value = getattr(arg, "meta", {}).get("example_value")
        if isinstance(value, torch.Tensor):
            outputs.append(f"{_abbr(value.dtype)}[{', '.join(str(s) for s in value.shape)}]")
    return inputs, outputs, elements


# ---------------------------------------------------------------------------------------------
# Capture session: compiled-function calls and eager stages as events
# ---------------------------------------------------------------------------------------------


def _function_name(fn) -> str:
    module = getattr(fn, "__module__", "") or ""
    return f"{module.removeprefix('compiled_step.')}.{getattr(fn, '__qualname__', repr(fn))}"


def _phase(function: str) -> str:
    if function.startswith("kernels."):
        return "Phase A"
    if function.startswith("rules."):
        return "Phase B"
    return "compiled"


def _arg_key(value):
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, value.device.type, value.dim())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_arg_key(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def _grad_elements(fn, args, kwargs) -> int:
    """Elements of the grads a call processes (its ``grads`` list or ``grad`` tensor)."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return 0
    grads = bound.arguments.get("grads", bound.arguments.get("grad"))
    if isinstance(grads, torch.Tensor):
        return grads.numel()
    if isinstance(grads, (list, tuple)):
        return sum(g.numel() for g in grads if isinstance(g, torch.Tensor))
    return 0


@dataclass
class Event:
    kind: str  # "graph", "scale", "all_reduce", "finish", "break"
    text: str  # rendered description (graph events: filled at render time)
    graphs: tuple[int, ...] = ()  # indices into CaptureSession.backend.graphs
    elements: int = 0  # graph events: grad elements of this call


class CaptureSession:
    """One recording backend shared by every capture in a process, so configurations that use the
    same graph compile it once. Graphs are attributed to calls by (function, argument dtypes and
    structure), which is what selects a Dynamo cache entry here."""

    def __init__(self):
        self.backend = RecordingBackend()
        self.graphs_by_key: dict[tuple, list[int]] = {}
        self.events: list[Event] | None = None
        self.compiles_during_capture = 0

    def call(self, fn, compiled, *args, **kwargs):
        key = (fn, _arg_key(args), _arg_key(sorted(kwargs.items())))
        before = len(self.backend.graphs)
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()) if v is not None and v is not False)
        self.backend.current_function = _function_name(fn) + (f"({shown})" if shown else "")
        result = compiled(*args, **kwargs)
        new = list(range(before, len(self.backend.graphs)))
        if new:
            self.graphs_by_key.setdefault(key, []).extend(new)
            self.compiles_during_capture += len(new)
        ids = tuple(self.graphs_by_key.get(key, ()))
        if not ids:
            raise RuntimeError(
                f"compiled_step.graphs: a call of {_function_name(fn)} ran a graph this session never saw compile; "
                "the argument signature used to attribute graphs no longer matches Dynamo's cache entries"
            )
        if self.events is not None:
            self.events.append(Event("graph", "", ids, _grad_elements(fn, args, kwargs)))
        return result

    def traced_compiler(self, base: kernels.Compiler) -> kernels.Compiler:
        session = self

        class _TracingCompiler(kernels.Compiler):
            def get(self, fn):
                compiled = super().get(fn)
                return functools.partial(session.call, fn, compiled)

        tracing = _TracingCompiler(base.backend, enabled=base.enabled, verbose=base.verbose)
        return tracing

    @contextlib.contextmanager
    def observing(self) -> Iterator[list[Event]]:
        """Record graph calls, eager scaling, collectives and the norm finish of one step, in order."""
        from compiled_step.lifecycle import fp8 as fp8_lifecycle

        events: list[Event] = []
        real_all_reduce, real_scale, real_finish = collectives._all_reduce, norms.apply_scale, norms.finish
        real_fp8_scales = fp8_lifecycle.fp8_scales_from_amax

        def all_reduce(t, op, reduction):
            op_name = getattr(op, "name", None) or str(op).rsplit(".", 1)[-1]
            if any(e.kind == "finish" for e in events):  # after the norm: the FP8 weights' amax
                carries = "amax of the FP8 weights"
            elif reduction.members:
                carries = f"partial norms of groups {list(reduction.members)}, stacked"
            else:
                carries = "the combined partial norm of all groups"
            shape = ", ".join(str(s) for s in t.shape)
            events.append(Event("all_reduce", f"all_reduce({op_name}) over {reduction.label!r}: "
                                              f"{_abbr(t.dtype)}[{shape}] ({carries})"))
            return real_all_reduce(t, op, reduction)

        def fp8_scales(*args, **kwargs):
            events.append(Event("fp8", "FP8 scales from the amax (torchao's formula; no sync)"))
            return real_fp8_scales(*args, **kwargs)

        def apply_scale(kind, partial, scale):
            if scale is not None:
                events.append(Event("scale", "group partial x |scale|^p (grad_scale, PP and EP factors: a 0-d tensor)"))
            return real_scale(kind, partial, scale)

        def finish(kind, partial, max_norm):
            clip = (f"clip coefficient min(1, {max_norm!r} / (total + 1e-6))" if max_norm is not None
                    else "no clipping (coefficient 1)")
            events.append(Event("finish", f"total norm, {clip}, finite flag"))
            return real_finish(kind, partial, max_norm)

        self.events = events
        collectives._all_reduce, norms.apply_scale, norms.finish = all_reduce, apply_scale, finish
        fp8_lifecycle.fp8_scales_from_amax = fp8_scales
        try:
            yield events
        finally:
            collectives._all_reduce, norms.apply_scale, norms.finish = real_all_reduce, real_scale, real_finish
            fp8_lifecycle.fp8_scales_from_amax = real_fp8_scales
            self.events = None


_SESSION: CaptureSession | None = None


def session() -> CaptureSession:
    """The process-wide session of the reference configurations, whose graphs they share.

    Only captures at the reference sizes may use it: a graph's byte counts are those of the call
    that compiled it, and a later capture with the same functions and dtypes reuses it. A run dump
    (``dump_run_graphs``) therefore gets a session of its own.
    """
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


@dataclass
class Capture:
    """Everything a file is rendered from."""

    name: str
    header: list[str]
    graphs: list[CompiledGraph]  # in order of first use
    events: list[Event]  # step 1, graph events carry indices into ``graphs``
    plan_lines: list[str]
    graph_breaks: list[str]
    recompiles_step2: int | None  # None: step 2 did not run (a graph break stopped the capture)
    reference_elements: int  # elements of the reference bucket (bytes-per-parameter divisor)
    bucket_line: str = ""  # what each sharding group holds (the sizes graphs are compiled at)
    generated_by: list[str] = field(default_factory=list)  # header lines after the first


def _group_lines(plan) -> list[str]:
    lines = []
    for i, group in enumerate(plan.groups):
        key = group.key
        sizes = [planning.local_tensor(p).numel() for p in group.params]
        mesh = "plain tensors"
        if key.mesh_key:
            _, names, shape, placements = key.mesh_key
            mesh = f"DeviceMesh {names or '(unnamed)'} of shape {tuple(shape)}, placements {tuple(placements)}"
        large = getattr(group, "large", range(len(group.params)))
        small = getattr(group, "small", ())
        lines.append(
            f"group {i}: param_groups[{key.param_group}], {key.device.type}, {str(key.dtype).replace('torch.', '')}, "
            f"{mesh}, expert={key.is_expert}{', FP8 weights' if getattr(key, 'fp8', False) else ''}; {len(group.params)} params ({len(large)} bucketed, {len(small)} packed), "
            f"{sum(sizes):,} local elements"
        )
    lines.append("plan.reductions (one collective each, in this order): " + (
        "; ".join(f"{r.label!r} over groups {list(r.members)}" for r in plan.reductions) or "none"))
    lines.append(f"plan.pp: {plan.pp.label!r} (reduced last)" if plan.pp is not None else "plan.pp: none")
    return lines


def _break_reason(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _normalize_text(f"{type(error).__name__}: {first}")


_GENERATED_BY = [
    f"# Generated by `python -m compiled_step graphs` (compiled_step/graphs.py) with torch {GOLDEN_TORCH_VERSION} "
    "on CPU. Do not edit:",
    "# regenerate with `python -m compiled_step graphs` or `EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graphs.py`.",
]


def capture(ref: Reference, sess: CaptureSession | None = None, *, bucket_size: int = REFERENCE_BUCKET_SIZE,
            setup: Setup | None = None, extra_header: Sequence[str] = (),
            generated_by: Sequence[str] | None = None) -> Capture:
    """Run two FusedStep steps of ``ref`` with the recording backend and collect what to render."""
    from compiled_step import FusedStep

    sess = sess or session()
    setup = setup or ref.layout(ref.dtype)
    optimizer = ref.make_optimizer(setup.params)
    fused = FusedStep(optimizer, max_grad_norm=ref.max_grad_norm, norm_type=ref.norm_type, bucket_size=bucket_size,
                      backend=sess.backend, **setup.fused_kwargs)
    tracing = sess.traced_compiler(fused._compiler)
    fused._compiler = fused._norm.compiler = tracing  # every compiled call goes through the session

    def set_grads(step):
        for p, g in zip(setup.params, setup.grads(step)):
            p.grad = g

    counters = torch._dynamo.utils.counters
    breaks_before = sum(counters["graph_break"].values())
    breaks: list[str] = []
    recompiles = None
    set_grads(0)
    with sess.observing() as events:
        try:
            fused.step(**setup.step_kwargs)
        except torch._dynamo.exc.Unsupported as error:  # fullgraph=True turns a graph break into this
            breaks.append(_break_reason(error))
            events.append(Event("break", f"graph break, capture stopped: {breaks[-1]}"))
    if not breaks:
        # A second step as an LR scheduler would make it: new lr and grads, step counts advanced.
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * 0.5
        set_grads(1)
        before = sess.compiles_during_capture
        fused.step(**setup.step_kwargs)
        recompiles = sess.compiles_during_capture - before
    counted = sum(counters["graph_break"].values()) - breaks_before
    if counted and not breaks:
        breaks.append(f"{counted} graph break(s) counted by Dynamo")

    # Graphs in order of first use; graph events point into that list.
    order: dict[int, int] = {}
    for event in events:
        for gid in event.graphs:
            order.setdefault(gid, len(order))
    for event in events:
        event.graphs = tuple(order[g] for g in event.graphs)
    plan = fused._plan
    header = [
        f"optimizer: {ref.describe_optimizer()}; params {str(ref.dtype).replace('torch.', '')}",
        f"FusedStep(max_grad_norm={ref.max_grad_norm!r}, norm_type={ref.norm_type!r}, bucket_size={bucket_size}, "
        f"pack_threshold={getattr(fused.config, 'pack_threshold', 0)}, backend=<recording backend, then inductor>)",
        *setup.notes,
        *(["world: one process, gloo, rank 0 of 1 (in-memory store): the meshes have size 1, but the DTensors, "
            "the plan and its reductions are real and every collective below is a real all_reduce"]
          if ref.distributed else []),
        *extra_header,
    ]
    threshold = getattr(fused.config, "pack_threshold", 0)
    large = [p.numel() for p in setup.params if p.numel() > threshold]
    small = [p.numel() for p in setup.params if p.numel() <= threshold]
    reference_elements = sum(large[:bucket_size])
    bucket_line = (
        f"bucket: {len(large)} bucketed params of {', '.join(f'{n}' for n in sorted(set(large))) or '-'} elements"
        f"{' (one full bucket)' if len(large) == bucket_size else ''} + {len(small)} packed params of "
        f"{', '.join(str(n) for n in small) or '-'} elements per sharding group; every graph is compiled at its "
        "first call, so byte counts are for those sizes"
    )
    return Capture(
        name=ref.name,
        header=header,
        graphs=[sess.backend.graphs[g] for g in sorted(order, key=order.get)],
        events=events,
        plan_lines=_group_lines(plan) if plan is not None else ["(no plan: the step stopped before planning)"],
        graph_breaks=breaks,
        recompiles_step2=recompiles,
        reference_elements=reference_elements,
        bucket_line=bucket_line,
        generated_by=list(generated_by) if generated_by is not None else [
            line.replace(GOLDEN_TORCH_VERSION, torch.__version__.split("+")[0], 1) for line in _GENERATED_BY],
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


def _per_element(num: int, den: int) -> str:
    return f"{num / den:.2f}" if den else "n/a"


def _bytes_per_parameter(cap: Capture) -> float | None:
    """(Phase A graph + Phase B bucket-update graph bytes) / reference bucket elements."""
    phase_a = [g for g in cap.graphs if _phase(g.function) == "Phase A"]
    bucket_b = [g for g in cap.graphs if _phase(g.function) == "Phase B" and "_packed" not in g.function]
    if not (phase_a and bucket_b and cap.reference_elements):
        return None
    if phase_a[0].elements != cap.reference_elements or bucket_b[0].elements != cap.reference_elements:
        return None  # compiled at other sizes than the reference bucket
    return (phase_a[0].bytes_accessed + bucket_b[0].bytes_accessed) / cap.reference_elements


def summary_numbers(cap: Capture) -> str:
    """The headline numbers of a capture in one line (pinned inline by the tests)."""
    per_phase: dict[str, int] = {}
    for g in cap.graphs:
        per_phase[_phase(g.function)] = per_phase.get(_phase(g.function), 0) + 1
    bpp = _bytes_per_parameter(cap)
    return (
        f"graphs={len(cap.graphs)} ({', '.join(f'{k}: {v}' for k, v in per_phase.items())}) "
        f"recompiles_step2={cap.recompiles_step2} graph_breaks={len(cap.graph_breaks)} "
        f"kernels={[g.kernels for g in cap.graphs]} bytes_per_param={'n/a' if bpp is None else f'{bpp:.2f}'}"
    )


def _schedule_lines(cap: Capture) -> list[str]:
    rows: list[tuple[str, str]] = []
    for event in cap.events:
        if event.kind == "graph":
            graph_ids = ", ".join(str(i + 1) for i in event.graphs)
            function = cap.graphs[event.graphs[0]].function
            rows.append((_phase(function), f"graph {graph_ids} ({function})"))
        elif event.kind == "all_reduce":
            rows.append(("collective", event.text))
        else:
            rows.append(("eager" if event.kind != "break" else "ERROR", event.text))
    lines, i = [], 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j] == rows[i]:
            j += 1
        where, what = rows[i]
        count = f" x{j - i} calls" if where.startswith("Phase") and j - i > 1 else (
            " x1 call" if where.startswith("Phase") else (f" (x{j - i})" if j - i > 1 else ""))
        lines.append(f"{len(lines) + 1:2d}. {where:<10} {what}{count}")
        i = j
    if not any(e.kind == "all_reduce" for e in cap.events):
        lines.append("    (no collective: plan.reductions is empty and plan.pp is None)")
    return lines


def _inputs_lines(g: CompiledGraph) -> list[str]:
    width = max((len(i.name) for i in g.inputs), default=0)
    lines = []
    for info in g.inputs:
        count = f"{info.count} x " if info.count > 1 else ""
        access = "read, written in place" if info.written else "read"
        lines.append(f"  {info.name:<{width}}  {count}{info.dtype}{info.shape}  {access}")
    return lines


def _nodes_line(g: CompiledGraph) -> str:
    groups: dict[tuple[int, int], int] = {}
    for node in g.nodes:
        groups[node] = groups.get(node, 0) + 1
    parts = [f"{n} x ({ops} op{'s' if ops != 1 else ''}, {b:,} B)" for (ops, b), n in groups.items()]
    return f"Inductor scheduler nodes: {len(g.nodes)}: " + ", ".join(parts)


def render(cap: Capture, *, keep_source: bool = False) -> str:
    """The text of one graph file."""
    out = [
        f"{HEADER_MARK}: {cap.name}",
        *cap.generated_by,
        "#",
        *[f"# {line}" for line in cap.header],
        f"# {cap.bucket_line}",
        "",
        "== Summary ==",
    ]
    per_phase: dict[str, int] = {}
    for g in cap.graphs:
        per_phase[_phase(g.function)] = per_phase.get(_phase(g.function), 0) + 1
    out.append(f"graphs compiled: {len(cap.graphs)} (" + ", ".join(f"{k}: {v}" for k, v in per_phase.items()) + ")")
    if cap.recompiles_step2 is not None:
        out.append(f"graphs compiled by step 2 (lr halved, new grads): {cap.recompiles_step2}")
    out.append(f"graph breaks: {len(cap.graph_breaks)}" + (" (fullgraph=True)" if not cap.graph_breaks else ""))
    out += [f"  - {reason}" for reason in cap.graph_breaks]
    total_kernels = sum(g.kernels for g in cap.graphs)
    out.append(f"kernels (Inductor's generated_kernel_count): {total_kernels} = "
               + " + ".join(f"{g.kernels} (graph {i + 1})" for i, g in enumerate(cap.graphs)))
    out.append("bytes accessed (Inductor's num_bytes_accessed, at compile-time sizes):")
    for i, g in enumerate(cap.graphs):
        out.append(f"  graph {i + 1} {_phase(g.function)} {g.function}: {g.bytes_accessed:,} B for {g.elements:,} "
                   f"grad elements = {_per_element(g.bytes_accessed, g.elements)} B/element")
    bpp = _bytes_per_parameter(cap)
    out.append("bytes per parameter (Phase A + Phase B bucket update, reference bucket of "
               f"{cap.reference_elements:,} elements): " + ("n/a" if bpp is None else f"{bpp:.2f}"))
    out += ["", "== Sharding groups and reductions (the plan) ==", *cap.plan_lines]
    out += ["", "== Where the collectives sit (step 1, in the order it ran) ==", *_schedule_lines(cap)]
    for i, g in enumerate(cap.graphs):
        out += [
            "",
            f"== Graph {i + 1}: {_phase(g.function)}, {g.function} ==",
            "inputs (size symbols omitted; n: a symbolic size per tensor):",
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


def _run_plan(fused):
    plan = getattr(fused, "_plan", None)
    return plan if plan is not None else fused._current_plan()


def dump_run_graphs(out_dir, fused) -> list[Path]:
    """Write the graphs of an existing FusedStep's configuration into ``out_dir/graphs/``.

    The run's compiled graphs are not recorded while it trains (it uses the ordinary Inductor
    backend), so this re-runs the capture on synthetic tensors that select the same graphs: the
    run's optimizer class and hyperparameters (per param group), param dtypes, device, bucket size,
    norm type and clipping, with as many bucketed and packed tensors as the run has (up to one
    bucket). The run's own plan (its sharding groups and the collectives between the graphs) is
    written next to them. Nothing of the run changes: its params, grads and state are not touched.
    Also writes Inductor's generated code (``*.output_code.py``), which depends on the machine.

    Returns the paths written. With ``compile=False`` the run compiled nothing: the file says so.
    """
    out = Path(out_dir) / "graphs"
    out.mkdir(parents=True, exist_ok=True)
    plan = _run_plan(fused)
    plan_lines = _group_lines(plan)
    cfg = fused.config
    if not cfg.compile:
        path = out / "run.txt"
        path.write_text("\n".join([
            f"{HEADER_MARK}: run",
            "# This run used FusedStep(compile=False): the same functions ran eagerly, no graph was compiled.",
            "",
            "== Sharding groups and reductions (the run's plan) ==",
            *plan_lines,
        ]) + "\n")
        return [path]

    optimizer = fused.optimizer
    accepted = set(inspect.signature(type(optimizer)).parameters) - {"params", "foreach", "fused"}
    # One capture per distinct graph selection: update variant (amsgrad, momentum), dtype, device.
    selections: dict[tuple, dict] = {}
    for group in plan.groups:
        pg = optimizer.param_groups[group.key.param_group]
        key = (fused.rule.variant(pg), group.key.dtype, str(group.key.device))
        sel = selections.setdefault(key, {"pg": pg, "param_groups": [], "group": group})
        sel["param_groups"].append(group.key.param_group)
    paths = []
    run_session = CaptureSession()  # never the reference session: these graphs compile at the run's sizes
    for (variant, dtype, device), sel in selections.items():
        hyper = tuple((k, v) for k, v in sorted(sel["pg"].items()) if k in accepted)
        dtype_name = str(dtype).replace("torch.", "")
        flags = [name for name, on in zip(getattr(variant, "_fields", ()), variant) if on is True]
        name = "-".join(["run", type(optimizer).__name__.lower(), dtype_name, *flags])
        ref = Reference(name, f"this run's {type(optimizer).__name__} graphs ({dtype_name})", type(optimizer), hyper,
                        dtype=dtype, max_grad_norm=cfg.max_grad_norm, norm_type=cfg.norm_type)
        # The sizes of the run's first such group (its first bucket and all its packed params): the
        # graphs are compiled at their first call, so these are the sizes the run compiled them at.
        group = sel["group"]
        numel = [planning.local_tensor(p).numel() for p in group.params]
        large = [numel[i] for i in getattr(group, "large", range(len(numel)))][: cfg.bucket_size]
        small = [numel[i] for i in getattr(group, "small", ())]
        setup = plain_layout(dtype, device, [(n,) for n in large + small])
        cap = capture(ref, run_session, bucket_size=cfg.bucket_size, setup=setup, extra_header=[
            f"synthetic 1-D tensors of the sizes of the run's first sharding group with these graphs (its first bucket "
            f"and its packed params), in param groups {sorted(set(sel['param_groups']))} (hyperparameters of "
            f"param group {sel['param_groups'][0]}); the run's collectives are those of its plan, below (this "
            "capture runs in one process and issues none)",
        ], generated_by=[
            "# Written by compiled_step.graphs.dump_run_graphs(out_dir, fused) for one run (not a golden: source "
            "lines are kept as comments).",
        ])
        cap.plan_lines = ["(the run's plan)", *plan_lines]
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
          "5-30 s on a small CPU) ...", file=sys.stderr, flush=True)
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
