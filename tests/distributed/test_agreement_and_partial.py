"""Ranks that hold different params agree on the collectives (no hang); Partial placements are normed
as the sums they stand for. Real gloo processes, world sizes 2 and 4, with a timeout so that a hang
fails the test instead of blocking CI.

References: torch only. Norms are ``torch.linalg.vector_norm`` of every grad materialised with
``full_tensor()`` (which sums Partial placements) or gathered from the ranks, in float64; tolerance
``rtol=1e-6``: the ranks' fp64 partials are summed in another order than the reference's.
"""

from __future__ import annotations

import pytest
import torch

from compiled_step import agreement, planning

from .harness import run_distributed

TIMEOUT = 180.0  # seconds for the scenario itself (a loaded 2-core machine); a hang fails the test here


# --------------------------------------------------------------------------- plan agreement


def _ep_ranks_without_experts(rank: int, world_size: int) -> dict:
    """Only rank 0 holds (plain, per-rank) expert params; every rank holds the same dense params.
    Without agreement rank 0 would wait forever in the EP all_reduce its peers never issue."""
    from torch.distributed.device_mesh import init_device_mesh

    from compiled_step import FusedStep, mark_experts

    moe_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(6, 5)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    parts = [dense]
    if rank == 0:
        experts = mark_experts(torch.nn.Linear(4, 3))
        parts.append(experts)
    params = [p for m in parts for p in m.parameters()]
    fused = FusedStep(torch.optim.SGD(params, lr=0.1), max_grad_norm=1.0, compile=False, model_parts=parts,
                      moe_mesh=moe_mesh, ep_axis_name="ep")
    norms, grads = [], []
    for step in range(2):
        step_grads = {}
        for i, p in enumerate(dense.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + 10 * step + i))
            step_grads[f"dense{i}"] = p.grad.clone()
        if rank == 0:
            for i, p in enumerate(experts.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(200 + 10 * step + i)) * 3
                step_grads[f"expert{i}"] = p.grad.clone()
        grads.append(step_grads)
        norms.append(fused.step().item())
    return {"norms": norms, "grads": grads, "groups": len(fused.plan.groups)}


@pytest.mark.parametrize("world_size", [2, 4])
def test_an_ep_rank_without_experts_joins_the_collective_instead_of_hanging(world_size):
    results = run_distributed(_ep_ranks_without_experts, world_size=world_size, timeout=TIMEOUT)
    for step in range(2):
        dense = torch.cat([g.double().flatten() for k, g in results[0]["grads"][step].items() if k.startswith("dense")])
        experts = torch.cat([g.double().flatten() for k, g in results[0]["grads"][step].items()
                             if k.startswith("expert")])
        # dense params are replicated (same grads everywhere): counted once; experts live on rank 0 only
        expected = torch.linalg.vector_norm(torch.cat([dense, experts])).item()
        for rank, r in enumerate(results):
            assert r["norms"][step] == pytest.approx(expected, rel=1e-6), (rank, step, r["norms"][step], expected)
    # ranks 1.. got an empty expert group (its zero partial joins rank 0's all_reduce)
    assert [r["groups"] for r in results] == [2] * world_size


def test_a_rank_that_cannot_reach_a_process_group_makes_every_rank_raise_the_same_error():
    """The agreement itself, on payloads as two ranks would send them: rank 1 holds no params reduced
    over the group ('g', ranks 0 and 1) and has no handle on it. Every rank evaluates the same
    payloads, so every rank raises (none is left waiting in a collective)."""
    sig = (0, "torch.float32", "torch.float32", ("tp",), (2,), "(Shard(dim=0),)", False, False, 0)
    payloads = [
        {"reductions": [(("g", (0, 1)), "tp", True, [(sig, 0)])], "resolvable": [("g", (0, 1))]},
        {"reductions": [], "resolvable": []},
    ]
    empty = planning.Plan((), [], torch.device("cpu"), 16, 0)
    for rank in (0, 1):
        resolvable = {("g", (0, 1)): (object(), "cpu")} if rank == 0 else {}
        with pytest.raises(RuntimeError, match=r"rank 1 holds no params reduced over 'tp' \(ranks \[0, 1\]\) and has "
                                               r"no handle on that process group"):
            agreement.reconcile(empty, payloads, rank, resolvable)


# --------------------------------------------------------------------------- Partial placements


def _partial_params(rank: int, world_size: int) -> dict:
    """A param that is itself Partial (each rank holds a summand), with a Partial grad, next to a
    Shard(0) param whose grad arrives Partial: the functional API norms the summed grads; FusedStep
    refuses the Partial param (an update of a sum of summands is undefined) on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    from compiled_step import FusedStep, clip_grad_norm

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    module = torch.nn.Module()
    summand = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank))
    module.partial = torch.nn.Parameter(DTensor.from_local(summand, mesh, [Partial()]))
    full = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))
    module.sharded = torch.nn.Parameter(DTensor.from_local(full.chunk(world_size)[rank], mesh, [Shard(0)]))
    g_partial = torch.randn(4, 3, generator=torch.Generator().manual_seed(50 + rank))
    module.partial.grad = DTensor.from_local(g_partial, mesh, [Partial()])
    g_full = torch.randn(8, 5, generator=torch.Generator().manual_seed(60))
    module.sharded.grad = DTensor.from_local(g_full * (rank + 1) / (world_size * (world_size + 1) / 2), mesh,
                                             [Partial()])
    summed = {name: p.grad.full_tensor().double() for name, p in module.named_parameters()}
    norm = clip_grad_norm(1.0, [module])
    clipped = {name: p.grad.full_tensor().double() for name, p in module.named_parameters()}
    try:
        FusedStep(torch.optim.SGD(module.parameters(), lr=0.1), max_grad_norm=1.0, compile=False).step()
        refused = None
    except ValueError as error:
        refused = str(error)
    return {"norm": norm.item(), "summed": summed, "clipped": clipped, "refused": refused}


@pytest.mark.parametrize("world_size", [2, 4])
def test_partial_params_and_grads_are_normed_as_their_sums(world_size):
    results = run_distributed(_partial_params, world_size=world_size, timeout=TIMEOUT)
    summed = results[0]["summed"]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in summed.values()])).item()
    coef = min(1.0, 1.0 / (expected + 1e-6))
    for rank, r in enumerate(results):
        assert r["norm"] == pytest.approx(expected, rel=1e-6), (rank, r["norm"], expected)
        for name, g in summed.items():
            torch.testing.assert_close(r["clipped"][name], g * coef, rtol=1e-6, atol=1e-9)
        assert r["refused"] is not None and "Partial placement" in r["refused"], r["refused"]
