"""A small FSDP2 model trained 20 steps with a compiled FusedStep on 2 gloo ranks matches the same
model trained in one process with eager ``clip_grad_norm_`` + ``torch.optim.AdamW``.

Both runs start from the same initial weights and see the same global batches (each rank gets half
of every batch; its loss is the mean over its half, and FSDP averages the grads over the 2 ranks, so
the grads are those of the mean over the global batch, as in the reference).

Tolerance, fp32: the reference backward sums the batch in one order; FSDP sums each rank's half,
then gloo's reduce-scatter adds the halves and divides by 2, so grads differ by ~1 ulp (~1e-7
relative). The reference norm is torch's fp32 ``clip_grad_norm_`` and ours is accumulated in fp64.
AdamW normalises the update, so these differences stay ~1e-7 per step and do not grow much over 20
steps at lr=1e-2. We allow rtol=1e-5, atol=1e-6 on the params at every step (as tests/test_parity.py
does for fp32) and rtol=1e-5 on the norms; measured worst cases: 7.5e-8 absolute on the params,
1.1e-7 relative on the norms. A negative control shows the check is sharp: the same reference
without clipping ends > 1e-2 (measured 5.7e-2) away.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .harness import run_distributed

WORLD_SIZE = 2
STEPS = 20
IN, HIDDEN, OUT = 16, 32, 4
PER_RANK = 8
LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 1.0
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)
NORM_RTOL = 1e-5


def _model() -> nn.Module:
    torch.manual_seed(2024)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step. Targets from a fixed random map, scaled so that the grad norm
    is above MAX_NORM in most steps (17 of 20: clipped) and below it in a few (not clipped)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(WORLD_SIZE * PER_RANK, IN, generator=gen)
    teacher = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(99))
    return x, 2.5 * torch.sin(x @ teacher)


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)


def _train_fsdp(rank: int, world_size: int) -> dict:
    import torch._dynamo.utils as dynamo_utils
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from compiled_step import FusedStep

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fused = FusedStep(_optimizer(model), max_grad_norm=MAX_NORM, compile=True, bucket_size=4, model_parts=[model])
    out = {"norms": [], "params": [], "graphs": []}
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        nn.functional.mse_loss(model(x), y).backward()
        out["norms"].append(fused.step().item())
        fused.zero_grad()
        out["params"].append({k: p.full_tensor().detach().clone() for k, p in model.named_parameters()})
        out["graphs"].append(dynamo_utils.counters["stats"]["unique_graphs"])
    return out


def _train_reference(clip: bool = True) -> dict:
    model = _model()
    opt = _optimizer(model)
    out = {"norms": [], "params": []}
    for step in range(STEPS):
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM if clip else float("inf"), foreach=False)
        out["norms"].append(norm.item())
        opt.step()
        opt.zero_grad()
        out["params"].append({k: p.detach().clone() for k, p in model.named_parameters()})
    return out


@pytest.fixture(scope="module")
def runs():
    # Cold, the 2 compiled graphs take ~15-30 s per rank on 2 cores; Inductor's disk cache makes
    # later runs fast.
    ranks = run_distributed(_train_fsdp, world_size=WORLD_SIZE, timeout=400)
    return ranks, _train_reference(clip=True), _train_reference(clip=False)


def _max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def test_ranks_agree(runs):
    ranks, _, _ = runs
    assert ranks[0]["norms"] == ranks[1]["norms"]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_norms_match_eager_clip_grad_norm(runs):
    ranks, ref, _ = runs
    ours = torch.tensor(ranks[0]["norms"], dtype=torch.float64)
    theirs = torch.tensor(ref["norms"], dtype=torch.float64)
    # Measured: <= 1.1e-7 relative.
    torch.testing.assert_close(ours, theirs, rtol=NORM_RTOL, atol=0)
    clipped = int((theirs > MAX_NORM).sum())
    assert STEPS // 2 <= clipped < STEPS, f"want clipped and unclipped steps, got {clipped} of {STEPS} clipped"


def test_params_match_eager_clip_and_adamw_every_step(runs):
    ranks, ref, _ = runs
    for step, (ours, theirs) in enumerate(zip(ranks[0]["params"], ref["params"])):
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], **PARAM_TOL, msg=lambda m, k=k, s=step: f"step {s} {k}: {m}")


def test_negative_control_without_clipping_is_far_off(runs):
    """The comparison is sharp enough to see the clip: the unclipped reference ends > 1e-2 away."""
    ranks, ref, unclipped = runs
    assert _max_rel(ranks[0]["params"][-1], unclipped["params"][-1]) > 1e-2
    assert _max_rel(ranks[0]["params"][-1], ref["params"][-1]) < 1e-4


def test_compiled_once_no_recompiles(runs):
    """FusedStep really ran compiled (Dynamo produced graphs) and nothing recompiled after step 1."""
    ranks, _, _ = runs
    for r in ranks:
        graphs = r["graphs"]
        assert graphs[0] >= 2, f"expected the compiled norm and update graphs, Dynamo counted {graphs[0]}"
        assert graphs[-1] == graphs[0], f"graphs per step: {graphs}"
