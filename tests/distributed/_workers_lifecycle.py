"""Rank-side scenarios for tests/distributed/test_fused_lifecycle.py: FusedStep's own lifecycle
(``fused.accumulate(k)`` + ``fused.step()``) on real FSDP2 modules over gloo.

Every scenario runs in the one 2-rank spawn of ``worker`` and returns plain numbers / lists; the
test module asserts on them in the parent. A scenario that raises is recorded as its traceback,
so one failure does not hide the others. FusedStep runs with ``compile=False`` here (the same
functions, eagerly): what these scenarios check is the lifecycle around the math (flags,
collectives, token hand-off, FP8 scale storage), and the compiled graphs are shown in the
single-process tests (tests/test_fused_lifecycle.py) instead, where compiles are shared.
"""

from __future__ import annotations

import importlib.util
import traceback

import torch
import torch.distributed as dist
from torch import nn

from compiled_step import FusedStep

BUCKET, PACK = 4, 20  # as tests/conftest.py: weights take the bucket path, biases the packed one
K = 3  # microbatches per step
MB = 4  # samples per microbatch per rank
STEPS = 2
MAX_NORM = 0.5  # below every step's total norm here, so clipping is active (checked by the tests)
LR, WD = 1e-2, 0.1
IN, HIDDEN, MID, CLASSES = 6, 12, 9, 5  # odd sizes: uneven FSDP shards
N_GROUPS = 3  # fully_shard'ed Linear layers (the root holds no params): reduce-scatters per sync

# Collectives counted by ``CollectiveCounter``. FSDP2 reduce-scatters gradients with
# ``dist.reduce_scatter_single`` in torch 2.13 and ``dist.reduce_scatter_tensor`` in torch 2.11
# (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, DefaultReduceScatter); the others are
# counted too, so a torch version that routes grads through another entry point (or HSDP's
# all-reduce) still shows up as a non-zero count. Names this torch lacks are skipped
# (``reduce_scatter_single`` does not exist in 2.11).
COUNTED = (
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_reduce",
    "all_gather_into_tensor",
)


class CollectiveCounter:
    """Wraps ``torch.distributed``'s collective functions (looked up at call time by FSDP2 and by
    compiled_step.collectives) and records each call as ``(name, op)``; ``take()`` returns and
    clears the record."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self._originals: dict = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def counting(*args, _name=name, _original=original, **kwargs):
                op = kwargs.get("op")
                self.calls.append((_name, None if op is None else str(op)))
                return _original(*args, **kwargs)

            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc) -> bool:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        return False

    def take(self) -> list[tuple[str, str | None]]:
        calls, self.calls = self.calls, []
        return calls


def _count(calls, *names) -> int:
    return sum(1 for name, _ in calls if name in names)


REDUCE_SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter")

# ----------------------------------------------------------------------------------------------
# Model, data, references
# ----------------------------------------------------------------------------------------------


def make_model(seed: int = 1234) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, MID), nn.Tanh(), nn.Linear(MID, CLASSES))


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's K * MB samples for ``step``; ~30% of the labels ignored, unevenly per microbatch."""
    gen = torch.Generator().manual_seed(1000 * step + 17 * rank + 5)
    x = torch.randn(K * MB, IN, generator=gen) * 2.0
    y = torch.randint(0, CLASSES, (K * MB,), generator=gen)
    y[torch.rand(K * MB, generator=gen) < 0.3] = -100
    return x, y


def global_tokens(y: torch.Tensor) -> int:
    """Label tokens over all ranks (what a training loop all-reduces before normalising)."""
    n = (y != -100).sum().to(torch.int64).reshape(1)
    dist.all_reduce(n)
    return int(n.item())


def loss_fn(model: nn.Module, x, y, n_global: int) -> torch.Tensor:
    """Sum over tokens / global tokens, x world size: FSDP2 averages grads over ranks, so the
    gradient it leaves is that of (global loss sum / global token count)."""
    loss = nn.functional.cross_entropy(model(x), y, ignore_index=-100, reduction="sum")
    return loss * (dist.get_world_size() / n_global)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, foreach=False)


def fused_step_for(model: nn.Module, **kwargs) -> tuple[torch.optim.Optimizer, FusedStep]:
    opt = adamw(model)
    options = dict(max_grad_norm=MAX_NORM, model_parts=[model], compile=False, bucket_size=BUCKET, pack_threshold=PACK)
    options.update(kwargs)
    return opt, FusedStep(opt, **options)


def full(model: nn.Module, what: str = "param") -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        t = p if what == "param" else p.grad
        out.append(t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone())
    return out


def max_diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b|, max |b|) over all tensors."""
    return (
        max(float((x - y).abs().max()) for x, y in zip(a, b)),
        max(float(y.abs().max()) for y in b),
    )


def reference_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, n_global: int):
    """Eager reference: one backward on the whole local batch, clip_grad_norm_, AdamW.step().
    Returns (pre-clip total norm, full grads before clipping)."""
    opt.zero_grad(set_to_none=True)
    loss_fn(model, x, y, n_global).backward()
    grads = full(model, "grad")
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_NORM)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    opt.step()
    return float(norm), grads


def read_flags(model: nn.Module) -> dict:
    """FSDP2's flags read straight from torch's private state (only the per-version attribute
    lookup, ``_fsdp_private``, is shared with the code under test):
    per param group (reduce_grads, all_reduce_grads, reshard_after_backward) and the root's
    is_last_backward."""
    from torch.distributed.fsdp import FSDPModule

    from compiled_step.lifecycle import _fsdp_private  # torch's private state, per torch version

    flags = {}
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        for i, group in enumerate(_fsdp_private.param_groups(module)):
            flags[f"{name or 'root'}[{i}]"] = (group.reduce_grads, group.all_reduce_grads, group.reshard_after_backward)
    flags["is_last_backward"] = _fsdp_private.state_context(model).is_last_backward
    return flags


def set_unusual_prior_flags(model: nn.Module) -> None:
    """A prior state the lifecycle must restore exactly, including a combination that
    ``set_requires_gradient_sync`` alone could not recreate (HSDP all-reduce off, reduce on)."""
    model[2].set_reshard_after_backward(False, recurse=False)
    model[4].set_requires_all_reduce(False, recurse=False)


# ----------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------


def scenario_accumulation_parity(rank: int, mesh) -> dict:
    """``fused.accumulate(K)`` + ``fused.step()`` vs the same FSDP model stepped eagerly on the
    whole batch (one backward, clip_grad_norm_, AdamW); collectives counted per microbatch."""
    model = shard(make_model(), mesh)
    ref = shard(make_model(), mesh)
    opt, fused = fused_step_for(model)
    ref_opt = adamw(ref)
    flag = fused.first_microbatch
    out: dict = {"grad_diff": [], "param_diff": [], "norms": [], "per_microbatch": [], "in_step": [],
                 "flags_inside": [], "flags_after": [], "fp8_flag": [], "tokens": [], "tokens_is_tensor": []}
    out["flags_before"] = read_flags(model)
    initial = full(model)
    with CollectiveCounter() as counter:
        for step in range(STEPS):
            x, y = local_batch(step, rank)
            n_global = global_tokens(y)
            ref_norm, ref_grads = reference_step(ref, ref_opt, x, y, n_global)
            fused.zero_grad()
            counter.take()
            with fused.accumulate(K) as acc:
                for xb, yb in acc.split((x, y)):
                    out["fp8_flag"].append(flag.value)
                    out["flags_inside"].append(read_flags(model))
                    loss_fn(model, xb, yb, n_global).backward()
                    acc.add_tokens((yb != -100).sum())
                    calls = counter.take()
                    out["per_microbatch"].append(
                        {"reduce_scatter": _count(calls, *REDUCE_SCATTERS), "all_reduce": _count(calls, "all_reduce")}
                    )
            out["flags_after"].append(read_flags(model))
            out["tokens_is_tensor"].append(isinstance(acc.num_label_tokens, torch.Tensor))
            out["tokens"].append((int(acc.num_label_tokens), int((y != -100).sum())))
            out["grad_diff"].append(max_diffs(full(model, "grad"), ref_grads))
            counter.take()
            norm = fused.step()
            out["in_step"].append(counter.take())
            out["fp8_flag_after_step"] = flag.value
            out["accumulation_consumed"] = fused.pending_num_label_tokens is None
            out["norm_dtype"] = str(norm.dtype)
            out["norms"].append((float(norm), ref_norm))
            out["param_diff"].append(max_diffs(full(model), full(ref)))
    out["moved"] = max_diffs(full(model), initial)  # control: how far one real run moves params
    return out


def scenario_exception(rank: int, mesh) -> dict:
    """An exception escaping ``with fused.accumulate(K)`` (mid-accumulation, then in the last
    microbatch after the final flags were switched on) restores every FSDP flag and resets the
    first-microbatch flag; the next accumulate + step still matches the eager reference."""
    model = shard(make_model(), mesh)
    ref = shard(make_model(), mesh)
    # Only the model under test gets unusual flags: with reshard_after_backward=False a plain
    # backward leaves the unsharded params registered (their .grad is None), which the eager
    # reference's model.parameters() would then see.
    set_unusual_prior_flags(model)
    opt, fused = fused_step_for(model)
    ref_opt = adamw(ref)
    out: dict = {"prior": read_flags(model), "inside_last": None, "after_error": [], "fp8_after_error": [],
                 "propagated": [], "notes": []}
    x, y = local_batch(0, rank)
    n_global = global_tokens(y)
    for fail_at in (1, K - 1):
        try:
            with fused.accumulate(K) as acc:
                for i, (xb, yb) in enumerate(acc.split((x, y))):
                    if i == K - 1:
                        out["inside_last"] = read_flags(model)
                    loss = loss_fn(model, xb, yb, n_global)
                    if i == fail_at:
                        raise KeyError(f"simulated failure in microbatch {fail_at}")  # after the forward
                    loss.backward()
                    acc.add_tokens((yb != -100).sum())
        except KeyError as exc:
            out["propagated"].append(str(exc))
            # A failed FSDP recovery would be attached here as a note (the user's error stays the one raised).
            out["notes"].extend(getattr(exc, "__notes__", []))
        out["after_error"].append(read_flags(model))
        out["fp8_after_error"].append(fused.first_microbatch.value)
    # The failed step is lost: zero the grads, then a normal step must give the reference's numbers.
    ref_norm, _ = reference_step(ref, ref_opt, x, y, n_global)
    fused.zero_grad()
    with fused.accumulate(K) as acc:
        for xb, yb in acc.split((x, y)):
            loss_fn(model, xb, yb, n_global).backward()
    norm = fused.step()
    out["norm"] = (float(norm), ref_norm)
    out["param_diff"] = max_diffs(full(model), full(ref))
    out["final"] = read_flags(model)
    return out


DP = 2  # dp_group_size handed to step() in the PP scenario: the PP divisor is tokens / DP


def scenario_pp_token_handoff(rank: int, mesh) -> dict:
    """With PP on (a 1-D "pp" mesh: each rank is a pipeline stage holding different params), the
    tokens added through ``acc.add_tokens`` become ``step()``'s ``num_label_tokens``.

    Four identical copies of this rank's stage see identical grads:
      A: ``fused.accumulate(K)`` with ``acc.add_tokens(tensor)``, then ``step(dp_group_size=DP)``;
      B: the same backwards by hand, then ``step(num_label_tokens=<int total>, dp_group_size=DP)``;
      C: by hand, ``step(dp_group_size=DP)``: no token count, so no PP scaling (control);
      D: a failed ``fused.accumulate`` that added tokens, then by hand, ``step(dp_group_size=DP)``:
         the lost step's tokens must not be applied (expected: C's numbers).
    Both stages see the same labels, so the token count (and the PP divisor) is the same on both.
    """
    from torch.distributed.device_mesh import init_device_mesh

    pp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pp",))
    x, _ = local_batch(0, rank)
    _, y = local_batch(0, 0)  # same labels on every stage
    xs, ys = x.tensor_split(K), y.tensor_split(K)
    tokens = int((y != -100).sum())

    def stage():
        model = make_model(seed=40 + rank)
        opt, fused = fused_step_for(model, device_mesh=pp_mesh, pp_axis_name="pp")
        return model, fused

    def sum_loss(model, xb, yb):
        return nn.functional.cross_entropy(model(xb), yb, ignore_index=-100, reduction="sum")

    def by_hand(model):
        for xb, yb in zip(xs, ys):
            sum_loss(model, xb, yb).backward()

    out: dict = {"tokens": tokens}
    (a, fa), (b, fb), (c, fc), (d, fd) = stage(), stage(), stage(), stage()
    with fa.accumulate(K) as acc:
        for xb, yb in acc.split((x, y)):
            sum_loss(a, xb, yb).backward()
            acc.add_tokens((yb != -100).sum())
    out["acc_tokens"] = int(acc.num_label_tokens)
    norm_a = fa.step(dp_group_size=DP)
    out["consumed"] = fa._accumulation is None
    by_hand(b)
    norm_b = fb.step(num_label_tokens=tokens, dp_group_size=DP)
    by_hand(c)
    norm_c = fc.step(dp_group_size=DP)
    try:
        with fd.accumulate(K) as acc_d:
            for i, (xb, yb) in enumerate(acc_d.split((x, y))):
                sum_loss(d, xb, yb).backward()
                acc_d.add_tokens((yb != -100).sum())
                if i == 1:
                    raise KeyError("simulated failure")
    except KeyError:
        pass
    fd.zero_grad()
    by_hand(d)
    norm_d = fd.step(dp_group_size=DP)
    out["norms"] = {"a": float(norm_a), "b": float(norm_b), "c": float(norm_c), "d": float(norm_d)}
    params = {k: [p.detach().clone() for p in m.parameters()] for k, m in (("a", a), ("b", b), ("c", c), ("d", d))}
    # Adam with clipping is nearly invariant to a constant grad scale, so the params barely show a
    # wrong token count; the returned norm (of the scaled grads) shows it directly.
    out["a_equals_b"] = all(torch.equal(p, q) for p, q in zip(params["a"], params["b"]))
    out["a_equals_c"] = all(torch.equal(p, q) for p, q in zip(params["a"], params["c"]))
    out["d_equals_c"] = all(torch.equal(p, q) for p, q in zip(params["d"], params["c"]))
    return out


TORCHAO_MISSING = None if importlib.util.find_spec("torchao") is not None else "torchao is not installed"


def scenario_torchao_fp8(rank: int, mesh) -> dict:
    """Real FSDP2 ``Float8Linear`` weights (torchao, ``enable_fsdp_float8_all_gather=True``):
    after ``fused.step()`` the scales stored where torchao's all-gather reads them equal what
    torchao's own ``precompute_float8_dynamic_scale_for_fsdp`` computes on the same updated
    weights, and the amax takes one MAX all-reduce per process group.

    float32: the middle layer is sharded on a second process group (``dist.new_group`` over the
    same ranks), so 3 weights on 2 process groups must take exactly 2 MAX all-reduces. bfloat16:
    every layer on the default group, 1 MAX all-reduce."""
    if TORCHAO_MISSING is not None:
        return {"skipped": TORCHAO_MISSING}
    try:
        from torchao.float8 import (
            Float8LinearConfig,
            convert_to_float8_training,
            precompute_float8_dynamic_scale_for_fsdp,
        )
        from torchao.float8.float8_linear import Float8Linear
    except Exception as exc:  # installed but not importable here (e.g. a build for another torch)
        return {"skipped": f"torchao does not import: {exc!r}"}

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 4)).to(dtype)
        convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
        if dtype == torch.float32:
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.fsdp import fully_shard

            other = DeviceMesh.from_group(dist.new_group(list(range(dist.get_world_size()))), "cpu")
            for i, layer in enumerate(model):
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=other if i == 2 else mesh)
            fully_shard(model, mesh=mesh)
            n_process_groups = 2
        else:
            shard(model, mesh)
            n_process_groups = 1
        float8 = [m for m in model.modules() if isinstance(m, Float8Linear)]
        opt, fused = fused_step_for(model)
        res: dict = {"n_float8": len(float8), "n_targets": len(fused.fp8_targets), "steps": [],
                     "n_process_groups": n_process_groups}
        gen = torch.Generator().manual_seed(100 + rank)
        for step in range(2):
            fused.zero_grad()
            x = torch.randn(8, 16, generator=gen).to(dtype)
            try:
                # The forward all-gathers FP8 weights cast with the stored scale (step 1: ours).
                model(x).float().square().sum().backward()
                how = "backward"
            except Exception as exc:  # no float8 matmul on this CPU build: grads by hand
                how = f"synthetic grads ({type(exc).__name__})"
                _synthetic_grads(model, gen)
            with CollectiveCounter() as counter:
                fused.step()
                calls = counter.take()
            stored = [float(m.weight._local_tensor._precomputed_scale) for m in float8]
            ours = fused.fp8_scales.tolist()
            amax = fused.fp8_amax.tolist()
            eager_amax = [float(m.weight.full_tensor().detach().abs().max().float()) for m in float8]
            for m in float8:
                m.weight._local_tensor._precomputed_scale = None
            precompute_float8_dynamic_scale_for_fsdp(model)  # torchao's own, on the same weights
            theirs = [float(m.weight._local_tensor._precomputed_scale) for m in float8]
            res["steps"].append({
                "how": how,
                "stored": stored,
                "ours": ours,
                "theirs": theirs,
                "amax": amax,
                "eager_amax": eager_amax,
                "max_all_reduces": sum(1 for name, op in calls if name == "all_reduce" and op and "MAX" in op),
                "all_reduces": sum(1 for name, _ in calls if name == "all_reduce"),
                "scale_dtype": str(fused.fp8_scales.dtype),
            })
        results[str(dtype)] = res
    return results


def _synthetic_grads(model: nn.Module, gen: torch.Generator) -> None:
    from torch.distributed.tensor import DTensor

    from compiled_step.planning import local_tensor

    for p in model.parameters():
        local = local_tensor(p)
        g = torch.randn(local.shape, generator=gen).to(local.dtype)
        p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


SCENARIOS = {
    "accumulation_parity": scenario_accumulation_parity,
    "exception": scenario_exception,
    "pp_token_handoff": scenario_pp_token_handoff,
    "torchao_fp8": scenario_torchao_fp8,
}


def worker(rank: int, world_size: int) -> dict:
    import time

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, scenario in SCENARIOS.items():
        start = time.perf_counter()
        try:
            results[name] = scenario(rank, mesh)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name + ".seconds"] = time.perf_counter() - start
        dist.barrier()  # keep ranks in step even if one scenario failed on one rank only
    return results
