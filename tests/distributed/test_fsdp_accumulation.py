"""FSDP2 gradient accumulation with compiled_step.lifecycle.fsdp, on real gloo processes.

One spawn of 2 ranks runs every distributed scenario (``_worker``) and returns plain
numbers; the tests below assert on them in the parent, one scenario per test. A scenario
that raises is recorded as a traceback string, so one failure does not hide the others.

Numerics: the model, data and optimizer run in float64, and the reference is an
*unsharded* copy of the model trained on the whole global batch (every rank's data) with
one backward per step. The accumulated FSDP run differs from it only in summation order
(microbatch partial sums, the reduce-scatter's sum over ranks), i.e. a few float64 ulps
per gradient element; ``RTOL``/``ATOL`` below leave a wide margin over that and are still
about ten orders of magnitude below the error of a real bug (a microbatch dropped or
counted twice, a missing reduce-scatter, a wrong token normalisation: all O(1e-2) here).

The single-process tests at the bottom cover the driver's API without FSDP.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from compiled_step.lifecycle import _fsdp_private  # torch's private FSDP state, per torch version
from compiled_step.lifecycle.fp8 import (
    FirstMicrobatchFlag,
    default_first_microbatch_flag,
    prepare_after_first_microbatch,
)
from compiled_step.lifecycle.fsdp import (
    GradAccumulation,
    Microbatch,
    accumulate,
    fsdp_modules,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
)

from .harness import run_distributed

WORLD_SIZE = 2  # all scenarios; the parity scenario also runs on 4 ranks
K = 3  # microbatches per step
MB = 4  # samples per microbatch per rank
STEPS = 2
RTOL, ATOL = 1e-10, 1e-12  # float64; see module docstring
IN, HIDDEN, CLASSES = 6, 12, 5

# ----------------------------------------------------------------------------------------
# Helpers run inside the ranks
# ----------------------------------------------------------------------------------------


def _make_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)
    ).double()


def _shard(model: nn.Module, mesh, **fully_shard_kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's data for one step: (world size * K * MB) samples, some labels ignored."""
    gen = torch.Generator().manual_seed(100 + step)
    n = dist.get_world_size() * K * MB
    x = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    # Uneven label counts per rank and per microbatch, so the token normalisation matters.
    y[torch.rand(n, generator=gen) < 0.3] = -100
    return x, y


def _local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _global_batch(step)
    per_rank = K * MB
    return x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]


def _loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, ignore_index=-100, reduction="sum")


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def _normalise_grads(model: nn.Module, local_tokens: int | torch.Tensor) -> None:
    """Turn FSDP's rank-averaged sum-loss grads into the grad of (global loss sum / global tokens)."""
    tokens = torch.as_tensor(local_tokens, dtype=torch.float64).clone()
    dist.all_reduce(tokens)
    factor = dist.get_world_size() / tokens.item()  # FSDP divides by world size; undo it, divide by tokens
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _reference_params() -> list[list[torch.Tensor]]:
    """Unsharded model on the global batch, one backward per step; params after each step."""
    model = _make_model()
    opt = _optimizer(model)
    history = []
    for step in range(STEPS):
        x, y = _global_batch(step)
        opt.zero_grad(set_to_none=True)
        loss = _loss_sum(model, x, y) / (y != -100).sum()
        loss.backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def _compare(model: nn.Module, reference: list[torch.Tensor]) -> tuple[float, int]:
    """(max |param - ref|, number of elements outside ATOL + RTOL * |ref|)."""
    max_abs, violations = 0.0, 0
    for p, ref in zip(model.parameters(), reference):
        diff = (p.full_tensor().detach() - ref).abs()
        max_abs = max(max_abs, float(diff.max()))
        violations += int((diff > ATOL + RTOL * ref.abs()).sum())
    return max_abs, violations


class _CollectiveCounter:
    """Counts the collectives FSDP2 issues for gradient reduction (torch 2.13 calls
    ``dist.reduce_scatter_single``, torch 2.11 ``dist.reduce_scatter_tensor``; ``all_reduce`` is
    counted too in case HSDP uses it). A name this torch lacks (``reduce_scatter_single`` before
    2.13) is not wrapped and counts 0."""

    NAMES = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        self._originals = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def counting(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)
        return False

    def take(self) -> dict[str, int]:
        snapshot = dict(self.counts)
        self.counts = dict.fromkeys(self.NAMES, 0)
        return snapshot


def _read_flags(model: nn.Module) -> dict:
    """The FSDP2 flags, read straight from torch's private state (only the per-version
    attribute lookup is shared with the code under test, none of its logic): per param group
    (reduce_grads, all_reduce_grads, reshard_after_backward), and the root context's
    is_last_backward."""
    flags = {}
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        for i, group in enumerate(_fsdp_private.param_groups(module)):
            flags[f"{name or 'root'}[{i}]"] = (group.reduce_grads, group.all_reduce_grads, group.reshard_after_backward)
    flags["is_last_backward"] = _fsdp_private.state_context(model).is_last_backward
    return flags


def _set_unusual_prior_flags(model: nn.Module) -> None:
    # A state the driver must restore exactly, including a combination that
    # set_requires_gradient_sync alone could not recreate.
    model[2].set_reshard_after_backward(False, recurse=False)
    model[4].set_requires_all_reduce(False, recurse=False)


# ----------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------


def _scenario_driver_parity(rank, mesh, reference):
    """k-microbatch accumulation through the driver vs the unsharded global-batch reference;
    collectives counted per microbatch."""
    model = _shard(_make_model(), mesh)
    opt = _optimizer(model)
    out = {"rs_per_microbatch": [], "param_err": [], "tokens_is_tensor": None}
    # Control: the comparison must see the difference one real step makes.
    out["control"] = _compare(model, reference[0])
    with _CollectiveCounter() as counter:
        for step in range(STEPS):
            x, y = _local_batch(step, rank)
            xs, ys = x.split(MB), y.split(MB)
            opt.zero_grad(set_to_none=True)
            counter.take()
            with accumulate([model], K) as acc:
                for mb in acc.microbatches():
                    _loss_sum(model, xs[mb.index], ys[mb.index]).backward()
                    acc.add_tokens((ys[mb.index] != -100).sum())
                    counts = counter.take()
                    out["rs_per_microbatch"].append(counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"])
            out["tokens_is_tensor"] = isinstance(acc.num_label_tokens, torch.Tensor)
            _normalise_grads(model, acc.num_label_tokens)
            opt.step()
            counter.take()
            out["param_err"].append(_compare(model, reference[step]))
    return out


def _scenario_seed_functions(rank, mesh, reference):
    """NeMo Automodel's free functions on a plain fully_shard model, NeMo-loop style."""
    model = _shard(_make_model(), mesh)
    opt = _optimizer(model)
    out = {"flags_after_prepare": None, "flags_after_final": None, "rs_per_microbatch": [], "param_err": []}
    flag = default_first_microbatch_flag()
    out["fp8_flag_values"] = []
    with _CollectiveCounter() as counter:
        for step in range(STEPS):
            x, y = _local_batch(step, rank)
            xs, ys = x.split(MB), y.split(MB)
            opt.zero_grad(set_to_none=True)
            counter.take()
            prepare_for_grad_accumulation([model])
            if step == 0:
                out["flags_after_prepare"] = _read_flags(model)
            tokens = 0
            for i in range(K):
                if i == K - 1:
                    prepare_for_final_backward([model])
                    if step == 0:
                        out["flags_after_final"] = _read_flags(model)
                out["fp8_flag_values"].append(flag.value)
                _loss_sum(model, xs[i], ys[i]).backward()
                if i == 0:
                    prepare_after_first_microbatch()
                tokens += int((ys[i] != -100).sum())
                counts = counter.take()
                out["rs_per_microbatch"].append(counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"])
            _normalise_grads(model, tokens)
            opt.step()
            counter.take()
            out["param_err"].append(_compare(model, reference[step]))
    flag.reset()
    return out


def _scenario_exception_restores_flags(rank, mesh, reference):
    """Flags restored after an exception escapes (mid-accumulation and in the last
    microbatch); after the driver's recovery, training continues and matches the reference."""
    model = _shard(_make_model(), mesh)
    opt = _optimizer(model)
    _set_unusual_prior_flags(model)
    prior = _read_flags(model)
    out = {"prior": prior, "after_error": [], "inside": None, "errors_propagated": 0, "param_err": [], "notes": []}
    x, y = _local_batch(0, rank)
    xs, ys = x.split(MB), y.split(MB)
    fp8_flag = FirstMicrobatchFlag()
    for fail_at in (1, K - 1):  # a middle microbatch, then the last (after the final flags flip)
        try:
            with accumulate([model], K, fp8_flag=fp8_flag) as acc:
                for mb in acc.microbatches():
                    if mb.index == 0 and fail_at == 1:
                        out["inside"] = _read_flags(model)
                    loss = _loss_sum(model, xs[mb.index], ys[mb.index])
                    if mb.index == fail_at:
                        raise KeyError(f"simulated failure in microbatch {fail_at}")  # after forward
                    loss.backward()
        except KeyError as exc:
            out["errors_propagated"] += 1
            # A failed FSDP recovery would be attached here as a note (the user's error stays the one raised).
            out["notes"].extend(getattr(exc, "__notes__", []))
        out["after_error"].append(_read_flags(model))
        out.setdefault("fp8_after_error", []).append(fp8_flag.value)
    # The failed step is lost: zero the grads, then train normally; the unusual prior flags
    # must not change the numbers (they only affect memory/communication).
    for step in range(STEPS):
        x, y = _local_batch(step, rank)
        opt.zero_grad(set_to_none=True)
        with accumulate([model], K) as acc:
            for xb, yb in acc.split((x, y)):  # MB-sized slices, the same as xs/ys
                _loss_sum(model, xb, yb).backward()
                acc.add_tokens((yb != -100).sum())
        _normalise_grads(model, acc.num_label_tokens)
        opt.step()
        out["param_err"].append(_compare(model, reference[step]))
    out["final"] = _read_flags(model)
    return out


def _scenario_exception_mid_forward(rank, mesh, reference):
    """An exception raised inside the forward, between two FSDP layers, leaves FSDP mid-iteration
    (the root's forward never finishes). The driver's recovery (``reset_iter_state``, or its port
    on torch 2.11, which lacks it) must bring FSDP back, so that the next steps match the
    reference, and the modules must hold their sharded parameters again (the no-sync backwards
    before a failure in the last microbatch leave the layers unsharded, and the failed forward
    never reshards them). Without the recovery, torch 2.11 leaves the unsharded parameters
    registered, so ``model.parameters()`` is not what the optimizer holds (checked by replacing
    the port with a no-op)."""
    model = _shard(_make_model(), mesh)
    opt = _optimizer(model)
    armed = [False]

    def fail_when_armed(module, args):
        if armed[0]:
            raise KeyError("simulated failure inside the forward")

    handle = model[1].register_forward_pre_hook(fail_when_armed)  # the Tanh between FSDP layers 0 and 2
    sharded = [p for group in opt.param_groups for p in group["params"]]
    out = {"errors_propagated": 0, "notes": [], "param_err": [], "registered_are_sharded": []}
    x, y = _local_batch(0, rank)
    xs, ys = x.split(MB), y.split(MB)
    # One synced forward-backward first, as in a run that has trained. Its grads stay until the
    # zero_grad after the failures (the failed step is lost; see reset_fsdp_iteration_state).
    _loss_sum(model, xs[0], ys[0]).backward()
    for fail_at in (0, K - 1):  # the first microbatch, then the last (after K - 1 no-sync backwards)
        try:
            with accumulate([model], K) as acc:
                for mb in acc.microbatches():
                    armed[0] = mb.index == fail_at
                    _loss_sum(model, xs[mb.index], ys[mb.index]).backward()
        except KeyError as exc:
            out["errors_propagated"] += 1
            out["notes"].extend(getattr(exc, "__notes__", []))
        armed[0] = False
        registered = list(model.parameters())
        out["registered_are_sharded"].append(len(registered) == len(sharded) and all(
            p is q for p, q in zip(registered, sharded)))
    handle.remove()
    for step in range(STEPS):
        x, y = _local_batch(step, rank)
        opt.zero_grad(set_to_none=True)
        with accumulate([model], K) as acc:
            for xb, yb in acc.split((x, y)):
                _loss_sum(model, xb, yb).backward()
                acc.add_tokens((yb != -100).sum())
        _normalise_grads(model, acc.num_label_tokens)
        opt.step()
        out["param_err"].append(_compare(model, reference[step]))
    return out


def _scenario_exception_mixed_precision(rank, mesh, reference):
    """Under mixed precision with a ``reduce_dtype``, FSDP keeps the no-sync grads upcast to it
    (torch 2.11 to 2.14 in ``FSDPParam.unsharded_accumulated_grad``, torch 2.15 in the unsharded
    parameter's ``.grad``). A failure in the last microbatch, after K - 1 no-sync backwards, leaves
    K - 1 microbatches there; the driver's recovery must drop them, so the next steps equal those of
    the same fully_shard model trained without the failure. Both models start from the same seed
    and run the same ops in the same order on the same ranks, so they must agree bit for bit.
    Control: a third model whose failure is not followed by the recovery (``reset_on_error=False``)
    must differ (the stale K - 1 microbatches are added to its next step)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64)
    x, y = _local_batch(0, rank)
    xs, ys = x.split(MB), y.split(MB)
    out = {"errors_propagated": 0, "notes": [], "mismatch": [], "control_mismatch": []}
    runs = {}
    for name in ("clean", "recovered", "not_recovered"):
        model = _shard(_make_model(), mesh, mp_policy=policy)
        opt = _optimizer(model)
        if name != "clean":
            try:
                with accumulate([model], K, reset_on_error=name == "recovered") as acc:
                    for mb in acc.microbatches():
                        loss = _loss_sum(model, xs[mb.index], ys[mb.index])
                        if mb.index == K - 1:
                            raise KeyError("simulated failure in the last microbatch")  # after forward
                        loss.backward()
            except KeyError as exc:
                out["errors_propagated"] += 1
                out["notes"].extend(getattr(exc, "__notes__", []))
        runs[name] = (model, opt)
    for step in range(STEPS):
        x, y = _local_batch(step, rank)
        for model, opt in runs.values():
            opt.zero_grad(set_to_none=True)
            with accumulate([model], K) as acc:
                for xb, yb in acc.split((x, y)):
                    _loss_sum(model, xb, yb).backward()
                    acc.add_tokens((yb != -100).sum())
            _normalise_grads(model, acc.num_label_tokens)
            opt.step()
        clean = [p.full_tensor().detach() for p in runs["clean"][0].parameters()]
        for key, name in (("mismatch", "recovered"), ("control_mismatch", "not_recovered")):
            params = [p.full_tensor().detach() for p in runs[name][0].parameters()]
            out[key].append(sum(int((p != q).sum()) for p, q in zip(params, clean)))
    return out


def _scenario_pp_enabled(rank, mesh, reference):
    """pp_enabled=True leaves every FSDP flag alone, so each microbatch still reduce-scatters."""
    model = _shard(_make_model(), mesh)
    _set_unusual_prior_flags(model)
    prior = _read_flags(model)
    out = {"prior": prior, "seen": [], "rs_per_microbatch": []}
    x, y = _local_batch(0, rank)
    xs, ys = x.split(MB), y.split(MB)
    prepare_for_grad_accumulation([model], pp_enabled=True)
    out["seen"].append(_read_flags(model))
    prepare_for_final_backward([model], pp_enabled=True)
    out["seen"].append(_read_flags(model))
    default_first_microbatch_flag().reset()
    with _CollectiveCounter() as counter:
        with accumulate([model], K, pp_enabled=True) as acc:
            for mb in acc.microbatches():
                out["seen"].append(_read_flags(model))
                _loss_sum(model, xs[mb.index], ys[mb.index]).backward()
                counts = counter.take()
                out["rs_per_microbatch"].append(counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"])
    out["seen"].append(_read_flags(model))
    return out


def _scenario_early_exit(rank, mesh, reference):
    """Leaving the block before the last microbatch raises, and the flags are still restored."""
    model = _shard(_make_model(), mesh)
    prior = _read_flags(model)
    x, y = _local_batch(0, rank)
    message = None
    try:
        with accumulate([model], K) as acc:
            for mb in acc.microbatches():
                _loss_sum(model, x[:MB], y[:MB]).backward()
                break
    except RuntimeError as exc:
        message = str(exc)
    return {"prior": prior, "after": _read_flags(model), "message": message, "n_fsdp": len(fsdp_modules([model]))}


_SCENARIOS = {
    "driver_parity": _scenario_driver_parity,
    "seed_functions": _scenario_seed_functions,
    "exception_restores_flags": _scenario_exception_restores_flags,
    "exception_mid_forward": _scenario_exception_mid_forward,
    "exception_mixed_precision": _scenario_exception_mixed_precision,
    "pp_enabled": _scenario_pp_enabled,
    "early_exit": _scenario_early_exit,
}


def _worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    reference = _reference_params()
    results = {}
    for name, scenario in _SCENARIOS.items():
        try:
            results[name] = scenario(rank, mesh, reference)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        # Keep ranks in step even if one scenario failed on one rank only.
        dist.barrier()
    return results


# ----------------------------------------------------------------------------------------
# Tests (parent process)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, world_size=WORLD_SIZE, timeout=180)


def _parity_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    model = _shard(_make_model(), mesh)
    # CLASSES=5 rows over 4 ranks: the last layer's shards are 2, 2, 1 and 0 rows.
    local_rows = model[4].weight.to_local().shape[0]
    return {"parity": _scenario_driver_parity(rank, mesh, _reference_params()), "last_layer_rows": local_rows}


def _scenario(results, name):
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"scenario {name} raised on rank {rank}:\n{res['error']}")
    return per_rank


N_GROUPS = 3  # three fully_shard'ed Linear layers; the root owns no parameters


def test_driver_accumulation_matches_global_batch_step(results):
    for rank, res in enumerate(_scenario(results, "driver_parity")):
        # Reference: unsharded model, global batch, one backward; float64 (module docstring).
        assert all(bad == 0 for _, bad in res["param_err"]), (rank, res["param_err"], RTOL, ATOL)
        assert res["tokens_is_tensor"], "tensor token counts must stay tensors (no host sync)"
        # Control: before any step the params are far from the reference's first step.
        assert res["control"][1] > 0 and res["control"][0] > 1e-3, res["control"]


def test_driver_accumulation_matches_on_four_ranks_with_an_empty_shard():
    results = run_distributed(_parity_worker, world_size=4, timeout=180)
    assert [r["last_layer_rows"] for r in results] == [2, 2, 1, 0]
    for rank, r in enumerate(results):
        res = r["parity"]
        assert all(bad == 0 for _, bad in res["param_err"]), (rank, res["param_err"], RTOL, ATOL)
        assert res["rs_per_microbatch"] == ([0] * (K - 1) + [N_GROUPS]) * STEPS, (rank, res["rs_per_microbatch"])


def test_no_reduce_scatter_before_last_microbatch(results):
    for rank, res in enumerate(_scenario(results, "driver_parity")):
        expected = ([0] * (K - 1) + [N_GROUPS]) * STEPS
        assert res["rs_per_microbatch"] == expected, (rank, res["rs_per_microbatch"])


def test_seed_functions_on_plain_fully_shard_model(results):
    for rank, res in enumerate(_scenario(results, "seed_functions")):
        off = {k: (False, False, False) for k in res["flags_after_prepare"] if k != "is_last_backward"}
        assert res["flags_after_prepare"] == {**off, "is_last_backward": False}, rank
        on = {k: (True, True, True) for k in off}
        assert res["flags_after_final"] == {**on, "is_last_backward": True}, rank
        assert len(off) == N_GROUPS
        assert res["rs_per_microbatch"] == ([0] * (K - 1) + [N_GROUPS]) * STEPS, rank
        assert all(bad == 0 for _, bad in res["param_err"]), (rank, res["param_err"], RTOL, ATOL)
        # NeMo Automodel's global first-microbatch flag: True on the first microbatch, then False.
        assert res["fp8_flag_values"] == ([True] + [False] * (K - 1)) * STEPS, rank


def test_flags_restored_after_exception_and_training_recovers(results):
    for rank, res in enumerate(_scenario(results, "exception_restores_flags")):
        assert res["errors_propagated"] == 2, rank
        assert res["notes"] == [], "FSDP's recovery (reset_iter_state, or its port on torch 2.11) failed"
        # Inside the block everything is off, whatever the prior state was.
        inside = res["inside"]
        assert all(v == (False, False, False) for k, v in inside.items() if k != "is_last_backward"), inside
        assert inside["is_last_backward"] is False
        # After each escaped exception: exactly the prior state, unusual flags included.
        assert res["prior"]["2[0]"] == (True, True, False) and res["prior"]["4[0]"] == (True, False, True)
        for after in res["after_error"]:
            assert after == res["prior"], (rank, after, res["prior"])
        assert res["fp8_after_error"] == [None, None], "an escaped exception resets the FP8 flag"
        assert res["final"] == res["prior"]
        # Recovery: the next steps give the reference numbers (stale microbatch grads dropped).
        assert all(bad == 0 for _, bad in res["param_err"]), (rank, res["param_err"], RTOL, ATOL)


def test_training_recovers_after_an_exception_inside_the_forward(results):
    for rank, res in enumerate(_scenario(results, "exception_mid_forward")):
        assert res["errors_propagated"] == 2, rank
        assert res["notes"] == [], "FSDP's recovery (reset_iter_state, or its port on torch 2.11) failed"
        # After each recovery the modules hold the sharded parameters the optimizer steps.
        assert res["registered_are_sharded"] == [True, True], rank
        # Reference: unsharded model, global batch, one backward; float64 (module docstring).
        assert all(bad == 0 for _, bad in res["param_err"]), (rank, res["param_err"], RTOL, ATOL)


def test_recovery_drops_the_reduce_dtype_grads_of_mixed_precision(results):
    for rank, res in enumerate(_scenario(results, "exception_mixed_precision")):
        assert res["errors_propagated"] == 2, rank
        assert res["notes"] == [], "FSDP's recovery (reset_iter_state, or its port on torch 2.11) failed"
        # Reference: the same model without the failure; bit for bit (scenario docstring).
        assert res["mismatch"] == [0] * STEPS, (rank, res["mismatch"])
        assert all(n > 0 for n in res["control_mismatch"]), (rank, res["control_mismatch"])


def test_pp_enabled_leaves_sync_alone(results):
    for rank, res in enumerate(_scenario(results, "pp_enabled")):
        for seen in res["seen"]:
            assert seen == res["prior"], (rank, seen, res["prior"])
        # Sync stays on, so every microbatch's backward reduce-scatters.
        assert res["rs_per_microbatch"] == [N_GROUPS] * K, (rank, res["rs_per_microbatch"])


def test_leaving_before_last_microbatch_raises_and_restores(results):
    for rank, res in enumerate(_scenario(results, "early_exit")):
        assert res["message"] is not None and "1 of 3 microbatches handed out" in res["message"], res["message"]
        assert res["after"] == res["prior"], rank
        assert res["n_fsdp"] == N_GROUPS + 1  # three layers and the root


# ----------------------------------------------------------------------------------------
# Single-process tests of the driver API (no FSDP modules: the flags part is a no-op)
# ----------------------------------------------------------------------------------------


def test_driver_fp8_flag_sequence_and_tokens():
    flag = FirstMicrobatchFlag()
    seen = []
    with GradAccumulation([nn.Linear(2, 2)], 4, fp8_flag=flag) as acc:
        for mb in acc.microbatches():
            assert isinstance(mb, Microbatch)
            seen.append((mb.index, mb.is_first, mb.is_last, flag.value))
            acc.add_tokens(3)
        assert acc.num_label_tokens == 12 and isinstance(acc.num_label_tokens, int)
    assert seen == [(0, True, False, True), (1, False, False, False), (2, False, False, False), (3, False, True, False)]
    assert acc.completed_microbatches == 4
    assert flag.value is False  # reset() is the optimizer step's job, not the accumulation's


def test_driver_tokens_mix_int_and_tensor_without_sync():
    with accumulate(nn.Linear(2, 2), 2) as acc:
        for mb in acc.microbatches():
            acc.add_tokens(torch.tensor(5))
            acc.add_tokens(2)
    assert isinstance(acc.num_label_tokens, torch.Tensor) and acc.num_label_tokens.dim() == 0
    assert int(acc.num_label_tokens) == 14


def test_driver_split_slices_nested_batches():
    batch = {"x": torch.arange(10).reshape(5, 2), "pair": (torch.arange(5), [torch.zeros(5, 1)])}
    with accumulate([], 2) as acc:
        chunks = list(acc.split(batch))
    assert [c["x"].shape[0] for c in chunks] == [3, 2]
    assert torch.equal(torch.cat([c["x"] for c in chunks]), batch["x"])
    assert torch.equal(torch.cat([c["pair"][0] for c in chunks]), batch["pair"][0])
    assert isinstance(chunks[0]["pair"], tuple) and isinstance(chunks[0]["pair"][1], list)
    # Bad batches raise out of the block (which then does not complain about unrun microbatches).
    with pytest.raises(ValueError, match="share"), accumulate([], 3) as acc:
        acc.split({"a": torch.zeros(4), "b": torch.zeros(5)})
    with pytest.raises(ValueError, match="fewer"), accumulate([], 3) as acc:
        acc.split(torch.zeros(2))
    with pytest.raises(TypeError, match="split"), accumulate([], 1) as acc:
        acc.split({"a": torch.zeros(4), "n": 3})
    # Leaving a block without running the microbatches is an error, not a silent no-op.
    with pytest.raises(RuntimeError, match="0 of 2 microbatches handed out"), accumulate([], 2):
        pass


def test_driver_rejects_bad_arguments_and_misuse():
    with pytest.raises(TypeError):
        GradAccumulation([nn.Linear(2, 2)], 2.0)
    with pytest.raises(TypeError):
        GradAccumulation([nn.Linear(2, 2)], True)
    with pytest.raises(ValueError):
        GradAccumulation([nn.Linear(2, 2)], 0)
    with pytest.raises(TypeError):
        GradAccumulation(["not a module"], 2)
    with pytest.raises(TypeError):
        GradAccumulation([nn.Linear(2, 2)], 2, pp_enabled=1)
    with pytest.raises(TypeError):
        GradAccumulation([nn.Linear(2, 2)], 2, fp8_flag=True)
    with pytest.raises(TypeError):
        prepare_for_grad_accumulation([nn.Linear(2, 2)], pp_enabled="no")
    acc = GradAccumulation([], 1)
    with pytest.raises(RuntimeError, match="only valid inside"):
        acc.add_tokens(1)
    with acc:
        for _ in acc.microbatches():
            with pytest.raises(TypeError):
                acc.add_tokens(1.5)
            with pytest.raises(ValueError):
                acc.add_tokens(-1)
            with pytest.raises(TypeError):
                acc.add_tokens(torch.tensor(1.0))
            with pytest.raises(ValueError):
                acc.add_tokens(torch.tensor([1, 2]))
        with pytest.raises(RuntimeError, match="once"):
            acc.microbatches()
    with pytest.raises(RuntimeError, match="single-use"):
        with acc:
            pass


def test_driver_exception_propagates_unchanged_and_resets_fp8_flag():
    flag = FirstMicrobatchFlag()
    marker = ValueError("boom")
    with pytest.raises(ValueError) as info:
        with accumulate([nn.Linear(2, 2)], 3, fp8_flag=flag) as acc:
            for mb in acc.microbatches():
                if mb.index == 1:
                    raise marker
    assert info.value is marker
    assert flag.value is None
    assert acc.completed_microbatches == 1


# ----------------------------------------------------------------------------------------
# The harness itself: a failing rank and a hung rank must surface in the pytest failure
# ----------------------------------------------------------------------------------------


# The workers live in harness.py: children importing this module would also import
# compiled_step and torch.distributed.tensor, seconds of start-up per process.


def test_harness_reports_the_failing_rank_traceback():
    from .harness import DistributedRunError, _selftest_rank_one_raises

    with pytest.raises(DistributedRunError) as info:
        run_distributed(_selftest_rank_one_raises, world_size=2, timeout=60)
    assert 1 in info.value.tracebacks
    assert "rank one exploded on purpose" in info.value.tracebacks[1]
    assert "_selftest_rank_one_raises" in str(info.value)  # the traceback is in the pytest message


def test_harness_times_out_with_stacks_of_the_hung_rank():
    from .harness import DistributedTimeoutError, _selftest_rank_zero_hangs

    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(_selftest_rank_zero_hangs, world_size=2, timeout=2)
    message = str(info.value)
    assert "ranks still running: [0]" in message
    assert "_selftest_sleep_forever" in message  # faulthandler's stack dump of the hung rank
