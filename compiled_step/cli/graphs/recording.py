"""The recording backend: a ``torch.compile`` backend that keeps the graph Dynamo hands over, compiles it
with Inductor while catching its post-grad graph and byte counts, and returns a callable carrying the
record; and the capture session that holds the records and one backend per family."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compiled_step.cli.graphs.normalize import strip_ansi

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
            post_grad_code=strip_ansi(grab.messages[-1]) if grab.messages else "(no post-grad graph was logged)",
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


def _hinted_numel(value: torch.Tensor) -> int:
    """Elements of a graph input at the sizes Inductor compiled for: a symbolic size counts as its hint.

    Inductor's ``num_bytes_accessed`` is computed at the hints, and a flat buffer's row count compiles with
    the fixed ``compiling.ROWS_HINT``, not the first call's size: the bytes-per-element divisor must use them too.
    """
    numel = 1
    for size in value.shape:
        numel *= size if isinstance(size, int) else int(size.node.hint)
    return numel


def _graph_signature(gm: torch.fx.GraphModule, example_inputs) -> tuple[list[InputInfo], list[str], int]:
    """Inputs (grouped by list argument), outputs, and the grad elements at the size hints of a Dynamo
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
            elements += _hinted_numel(value)
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
