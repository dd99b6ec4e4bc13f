"""How the step's graphs are compiled: static row widths, alignment hints, no autotuning, combo kernels.

* CPU: the compile sees every width (``ROW``, the table's and hyperparameters' columns) as a constant
  and only leading dims as symbols; the flat update's generated C++ loops over rows of the literal
  256 with no masked tail; the Inductor settings of ``compile_settings`` are the ones in force while
  the backend compiles, and are gone afterwards.
* CUDA (skipped without it, never run here): Triton pointers carry ``tt.divisibility=16``; the first
  step (compile + first kernel runs) allocates no clones of the mutated buffers; a bucket update is
  one or two kernels, not one per tensor.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from compiled_step import FusedStep, compiling
from compiled_step.planning import ROW
from compiled_step.rules import adam
from compiled_step.storage import round_up

TABLE_WIDTH = round_up(len(adam.TABLE_COLUMNS), 4)  # the table's row width, padded for alignment

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 7)).to(device)


def _set_grads(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


class _Inspecting:
    """A torch.compile backend that records what the compile sees, then runs the graph eagerly."""

    SETTINGS = ("assume_aligned_inputs", "triton.autotune_pointwise", "test_configs.force_filter_reduction_configs",
                "max_autotune", "coordinate_descent_tuning", "combo_kernels", "combo_kernels_pointwise_only",
                "combo_kernels_autotune", "cpp.dynamic_threads")

    def __init__(self):
        self.graphs: list[tuple[list, dict]] = []  # (placeholder example values, Inductor settings)

    def __call__(self, gm, example_inputs):
        import torch._inductor.config as inductor_config

        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        settings = {}
        for name in self.SETTINGS:
            owner = inductor_config
            for part in name.split("."):
                owner = getattr(owner, part)
            settings[name] = owner
        self.graphs.append((values, settings))
        return gm.forward


def test_only_leading_dims_are_symbolic_and_the_settings_are_in_force_while_compiling():
    model = _model()
    backend = _Inspecting()
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0, backend=backend,
                      compile_notice=False)
    _set_grads(model)
    fused.step()
    assert len(backend.graphs) == 3  # Phase A, finish, flat update (every param is aliased)
    widths = []
    # Every torch we test has these; combo kernels only where all of their settings exist (2.13 and 2.14, not
    # 2.11: then they stay off, as inductor_settings() logs).
    always = {"assume_aligned_inputs": True, "triton.autotune_pointwise": False,
              "test_configs.force_filter_reduction_configs": True, "max_autotune": False,
              "coordinate_descent_tuning": False, "cpp.dynamic_threads": True}
    combo = {"combo_kernels": True, "combo_kernels_pointwise_only": True, "combo_kernels_autotune": 0}
    has_combo = "combo_kernels" in compiling.inductor_settings()
    for values, settings in backend.graphs:
        assert {k: settings[k] for k in always} == always
        if has_combo:
            assert {k: settings[k] for k in combo} == combo
        else:
            assert settings["combo_kernels"] is False  # torch's default, untouched
        for value in values:
            if isinstance(value, torch.Tensor) and value.dim() > 1:
                assert all(type(s) is int for s in value.shape[1:]), value.shape  # a width: a constant
                widths.append(value.shape[1])
    # [rows, ROW] grads (Phase A; the flat update's params, grads and state), the table, hyperparameters,
    # partials: each width is the constant it is by design, and the row count stays a symbol.
    assert {ROW, TABLE_WIDTH, 2}.issubset(widths), widths
    flat_values, _ = backend.graphs[2]
    rows = [v.shape[0] for v in flat_values if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == ROW]
    assert len(rows) == 4 and all(isinstance(n, torch.SymInt) for n in rows), rows  # p, g, m, v: any row count
    # No side effect outside the compiling call: the process's own settings are torch's defaults.
    import torch._inductor.config as inductor_config

    assert inductor_config.triton.autotune_pointwise is True
    assert inductor_config.assume_aligned_inputs is False
    assert inductor_config.combo_kernels is False


@pytest.mark.parametrize("choice, env", [(False, None), (None, "0"), (None, "1"), (True, None)])
def test_the_combo_kernel_switch_is_in_force_while_compiling(monkeypatch, choice, env):
    """``combo_kernels=False`` (or ``COMPILED_STEP_COMBO_KERNELS=0``) compiles without combo kernels, True (or 1)
    with them; asking for them on a torch that lacks their settings raises before anything is built."""
    if env is None:
        monkeypatch.delenv(compiling.COMBO_ENV, raising=False)
    else:
        monkeypatch.setenv(compiling.COMBO_ENV, env)
    wanted = choice if choice is not None else env == "1"
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend = _Inspecting()
    if wanted and not compiling.combo_kernels_supported():  # torch 2.11
        with pytest.raises(ValueError, match="combo_kernels=True needs Inductor settings"):
            FusedStep(opt, max_grad_norm=1.0, backend=backend, combo_kernels=choice, compile_notice=False)
        return
    fused = FusedStep(opt, max_grad_norm=1.0, backend=backend, combo_kernels=choice, compile_notice=False)
    _set_grads(model)
    fused.step()
    assert len(backend.graphs) == 3
    assert {settings["combo_kernels"] for _, settings in backend.graphs} == {wanted}


def test_a_bad_combo_kernel_switch_is_refused(monkeypatch):
    with pytest.raises(TypeError, match="combo_kernels must be a bool or None"):
        FusedStep(torch.optim.SGD(_model().parameters(), lr=0.1), combo_kernels=1)
    monkeypatch.setenv(compiling.COMBO_ENV, "yes")
    with pytest.raises(ValueError, match="COMPILED_STEP_COMBO_KERNELS must be 0, 1 or unset"):
        FusedStep(torch.optim.SGD(_model().parameters(), lr=0.1))


def test_flat_buffers_compile_with_one_size_hint_whatever_size_compiled_first():
    """Inductor picks a reduction's split from the size hint of the first compile and the graph is shared by every
    later size: a small FusedStep compiled first must not hand its hint to a large one. Every ``[rows, ROW]``
    buffer's row count is a symbol whose hint is ``ROWS_HINT``, for the small and the large model alike."""
    backend = _Inspecting()
    for width in (8, 512):  # 2 rows per buffer, then ~260 rows: the second reuses the first's graphs
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
        fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0, backend=backend,
                          compile_notice=False)
        _set_grads(model)
        fused.step()
    assert len(backend.graphs) == 3  # compiled once, by the small model
    hints = [v.shape[0].node.hint for values, _ in backend.graphs for v in values
             if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == ROW]
    assert len(hints) == 5 and set(hints) == {compiling.ROWS_HINT}, hints  # Phase A's grads; p, g, m, v


def test_settings_this_torch_lacks_are_left_out_and_combo_kernels_need_all_of_theirs(monkeypatch, caplog):
    monkeypatch.setattr(compiling, "_INDUCTOR_SETTINGS",
                        {**compiling._INDUCTOR_SETTINGS, "no_such_setting": True, "triton.no_such_either": 1})
    monkeypatch.setattr(compiling, "_MISSING_LOGGED", False)
    with caplog.at_level("INFO", logger="compiled_step"):
        settings = compiling.inductor_settings()
    assert "no_such_setting" not in settings and "triton.no_such_either" not in settings
    lacks = [line for line in caplog.text.splitlines() if "Inductor lacks" in line]
    # said in one line, not silently dropped
    assert len(lacks) == 1 and "no_such_setting" in lacks[0] and "triton.no_such_either" in lacks[0]
    assert settings["assume_aligned_inputs"] is True
    monkeypatch.setattr(compiling, "_COMBO_SETTINGS", compiling._COMBO_SETTINGS + ("no_such_setting",))
    monkeypatch.setattr(compiling, "_MISSING_LOGGED", False)
    caplog.clear()
    with caplog.at_level("INFO", logger="compiled_step"):
        settings = compiling.inductor_settings()
    assert not any(key.startswith("combo_kernel") for key in settings)
    assert "combo kernels stay off" in caplog.text  # as on torch 2.11, which lacks combo_kernel_max_num_nodes
    assert settings["triton.autotune_pointwise"] is False  # the rest is unaffected


def _compiled_code(call) -> list[str]:
    """The code Inductor generates for one of the program's compiled calls, with its real arguments
    (compiled afresh: ``run_and_get_code`` resets Dynamo, and the FX graph cache is off)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), compiling.compile_settings():
        _, codes = run_and_get_code(call.fn, *call.args, **call.kwargs)
    return codes


def _flat_update_code(device: str) -> str:
    model = _model(device)
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0, compile_notice=False,
                      cuda_graphs=False)
    _set_grads(model)
    fused.step()
    call = next(c for c in fused.program.calls if c.function == "rules.adam.update_flat")
    codes = _compiled_code(call)
    assert len(codes) == 1
    return codes[0]


def test_flat_update_cpp_loops_over_whole_rows_of_the_literal_row_width():
    """With a symbolic width (main before this change) the row loop ran to ``ks1`` in 16-wide vectors
    followed by a masked tail (``C10_UNLIKELY(x1 >= 16*(ks1/16) ...)``) in every row, and the table was
    indexed with another symbol. Now the row loop's bound is the literal ``ROW`` and there is no tail."""
    code = _flat_update_code("cpu")
    assert re.search(r"for\(int64_t (\w+)=[^;]*; \1<static_cast<int64_t>\(%dL\);" % ROW, code), code
    assert "C10_UNLIKELY" not in code, code  # no masked tail loop
    assert re.search(r"%dL\*\w+\)\]" % TABLE_WIDTH, code), code  # a row of the table: a constant stride


# ------------------------------------------------------------------------------------------------ CUDA


def _unaligned_pointers(code: str) -> list[tuple[int, list[str]]]:
    """Per Triton kernel in ``code``: (its pointer count, the pointers its ``triton_meta`` does not mark
    ``tt.divisibility=16``). The signature is ``{'in_ptr0': '*fp32', ...}``, the configs
    ``[{(0,): [['tt.divisibility', 16]], ...}]`` (Inductor's format for Triton >= 3.2)."""
    kernels = []
    for meta in re.finditer(r"triton_meta=\{'signature': \{(?P<sig>[^}]*)\}.*?'configs': \[\{(?P<cfg>.*?)\}\]",
                            code, re.S):
        args = re.findall(r"'(\w+)': '([^']*)'", meta["sig"])
        aligned = {int(i) for i in re.findall(r"\((\d+),\): \[\['tt\.divisibility', 16\]", meta["cfg"])}
        pointers = [(i, name) for i, (name, kind) in enumerate(args) if kind.startswith("*")]
        kernels.append((len(pointers), [name for i, name in pointers if i not in aligned]))
    return kernels


@needs_cuda
def test_flat_update_triton_pointers_are_16_byte_aligned():
    """``tt.divisibility=16`` on every pointer of the flat update's kernels: 128-bit loads and stores."""
    code = _flat_update_code("cuda")
    kernels = _unaligned_pointers(code)
    assert kernels, code
    for n_pointers, unaligned in kernels:
        assert n_pointers > 0 and not unaligned, (unaligned, code)


@needs_cuda
def test_first_step_allocates_no_autotuning_clones_of_params_or_state():
    """Peak memory of the first step (build, compile, first kernel runs) on a ~64 M-param model: the
    params and grads the model had (freed during the build) plus FusedStep's params, grads and AdamW
    state, plus 16 MiB. Autotuning's clones of the mutated params and state (12 B/param) would add
    ~768 MiB on top once the old tensors are freed."""
    torch.cuda.empty_cache()
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(16)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False, cuda_graphs=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    # FusedStep's buffers: a param buffer over the flat rows, a grad buffer and two AdamW state buffers over
    # all rows (fp32), each one row longer (storage.LEAD's leading row).
    built = sum(4 * ROW * ((g.flat_rows + 1) + 3 * (g.rows + 1)) for g in fused.plan.groups)
    assert peak <= before + built + (16 << 20), (before, built, peak)


@needs_cuda
def test_bucket_update_is_combined_into_few_kernels():
    if "combo_kernels" not in compiling.inductor_settings():
        pytest.skip("combo kernels are off: this torch lacks one of their settings, or COMPILED_STEP_COMBO_KERNELS=0")
    """16 params FusedStep may not move (``flat_params=False``, no staging): one bucket call whose 16
    per-tensor kernels and the counts kernel Inductor combines (combo kernels, pointwise only)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1000 + 37 * i, device="cuda")) for i in range(16)]
    fused = FusedStep(torch.optim.AdamW(params, lr=1e-3), max_grad_norm=1.0, bucket_size=16, pack_threshold=0,
                      flat_params=False, compile_notice=False, cuda_graphs=False)
    for p in params:
        p.grad = torch.randn_like(p)
    fused.step()
    call = next(c for c in fused.program.calls if c.function == "rules.adam.update_bucket")
    code = "\n".join(_compiled_code(call))
    kernels = code.count("@triton.jit")
    assert 1 <= kernels <= 2, kernels
