"""Muon on FSDP2-sharded matrices, next to AdamW, on 2 and 4 gloo ranks, against the unsharded model
trained in one process with eager ``clip_grad_norm_`` + ``torch.optim.Muon`` + ``torch.optim.AdamW``.

Each rank holds rows of every matrix (FSDP2's Shard(0), torch.chunk's split: with 4 ranks the 10-row
matrices split 3/3/3/1 and the 5-row one 2/2/1/0, an empty shard). FusedStep sends each matrix's rows
to the rank that orthogonalizes it whole and the result's rows back: two all_to_all per step, named
in the plan and the program. Same global batches on both sides (each rank a slice; FSDP averages).

Tolerances: the grads differ by ~1 fp32 ulp between FSDP's reduce-scatter and the one-process
backward (see test_fsdp_training.py), and the clip coefficient in its last bits (fp64 vs fp32 norm),
which can flip a bfloat16 rounding of a Newton-Schulz input; torch's Newton-Schulz resolves its
output to bfloat16, so such a flip moves a Muon param by at most about ``lr * ratio * 2**-7`` per
step (test_muon.py): ``atol = STEPS * LR * max_ratio * 2**-7``. The first step's norm (same params on
both sides) agrees to ``rel=1e-5``; later norms come from params that differ by such flips, and agree to
``rel=1e-3``. AdamW's params (the biases) get grads that differ by as much; an AdamW step is at most
``lr`` in size, so a relative grad difference of 1e-3 moves it by ~``lr * 1e-3``: ``atol=1e-4`` over 6
steps at lr 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from .harness import run_distributed

STEPS = 6
PER_RANK = 4
LR = 2e-2
SIZES = [(16, 10), (10, 12), (12, 10), (10, 5), (5, 3)]  # Linear(in, out): weights (out, in)


def _model() -> nn.Module:
    torch.manual_seed(7)
    layers = []
    for i, (fan_in, fan_out) in enumerate(SIZES):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.Tanh()] if i < len(SIZES) - 1 else [])
    return nn.Sequential(*layers)


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(world * PER_RANK, SIZES[0][0], generator=gen)
    return x, torch.randn(world * PER_RANK, SIZES[-1][1], generator=gen) * 3


def _optimizers(model: nn.Module):
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    return torch.optim.Muon(matrices, lr=LR, weight_decay=0.1), torch.optim.AdamW(vectors, lr=1e-2, weight_decay=0.1)


def _sharded_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from compiled_step import FusedStep

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fused = FusedStep(list(_optimizers(model)), max_grad_norm=1.0, model_parts=[model], compile_notice=False)
    norms = []
    for step in range(STEPS):
        x, y = _batch(step, world)
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        norms.append(float(fused.step()))
        fused.zero_grad()
    return {"norms": norms, "plan": fused.plan.describe(), "program": fused.program.describe(),
            "params": {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}}


def _reference(world: int) -> dict:
    model = _model()
    muon, adamw = _optimizers(model)
    norms = []
    for step in range(STEPS):
        x, y = _batch(step, world)
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        muon.step()
        adamw.step()
        model.zero_grad()
    return {"norms": norms, "params": {k: p.detach().clone() for k, p in model.named_parameters()}}


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_muon_matches_unsharded_torch(world):
    results = run_distributed(_sharded_worker, world_size=world, timeout=300)
    ref = _reference(world)
    max_ratio = max(math.sqrt(max(1, out / fan_in)) for fan_in, out in SIZES)
    for rank, result in enumerate(results):
        assert result["norms"][0] == pytest.approx(ref["norms"][0], rel=1e-5)
        assert result["norms"][1:] == pytest.approx(ref["norms"][1:], rel=1e-3)
        for name, p in result["params"].items():
            tol = dict(rtol=0, atol=STEPS * LR * max_ratio * 2 ** -7) if name.endswith("weight") else \
                dict(rtol=0, atol=1e-4)
            torch.testing.assert_close(p, ref["params"][name], **tol, msg=lambda m: f"rank {rank} {name}: {m}")
        muon_group = [line for line in result["plan"] if "matrix stacks" in line]
        assert len(muon_group) == 1 and "2 all_to_all over 'dp' per step" in muon_group[0], result["plan"]
        exchanges = [line for line in result["program"] if "all_to_all" in line]
        assert len(exchanges) == 2, result["program"]  # one documented pair of collectives for every matrix
    for p, q in zip(results[0]["params"].values(), results[-1]["params"].values()):
        assert torch.equal(p, q)
