"""Distributed checkpointing of an FSDP2 run with FusedStep, on 2 gloo ranks.

Save with ``torch.distributed.checkpoint`` (``get_state_dict`` for model and optimizer, plus FusedStep
itself as a ``Stateful``), keep training, then resume a fresh model/optimizer/FusedStep from the
checkpoint and train the same steps: the resumed params, optimizer state and skip counter must be
bit-identical to the uninterrupted run's (tolerance 0: the same computation on the same values).
With bf16 moments (``bf16_moments``), the resumed moments are bfloat16 DTensors too.
"""

from __future__ import annotations

import pytest
import torch

from .harness import run_distributed


def _model(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, fused, steps, rank):
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
        loss = (model(torch.randn(16, 8, generator=gen)) ** 2).mean() * 40
        loss.backward()
        if step in (1, 4):  # a skipped step before the checkpoint (its count must be restored) and one after
            next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
        fused.step()
        fused.zero_grad()


def _full(model):
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def _dcp_worker(rank: int, world_size: int, checkpoint: str, moments: bool = False) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from compiled_step import FusedStep, bf16_moments

    declare = bf16_moments if moments else (lambda opt: opt)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    model = _model(mesh)
    opt = declare(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False, model_parts=[model])
    _train(model, fused, range(0, 3), rank)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "fused": fused}, checkpoint_id=checkpoint)
    _train(model, fused, range(3, 6), rank)
    expected = {"params": _full(model), "skipped": int(fused.skipped_steps),
                "optim": {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                          for k, v in get_state_dict(model, opt)[1]["state"]["0.weight"].items()}}

    model2 = _model(mesh)
    with torch.no_grad():  # a different starting point: everything must come from the checkpoint
        for p in model2.parameters():
            p.add_(1.0)
    opt2 = declare(torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1))
    fused2 = FusedStep(opt2, max_grad_norm=1.0, compile=False, model_parts=[model2])
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    state = {"model": model_sd2, "optim": optim_sd2, "fused": fused2}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model2, fused2, range(3, 6), rank)
    resumed = {"params": _full(model2), "skipped": int(fused2.skipped_steps),
               "optim": {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                         for k, v in get_state_dict(model2, opt2)[1]["state"]["0.weight"].items()}}
    return {"expected": expected, "resumed": resumed}


@pytest.mark.parametrize("moments", [False, True], ids=["fp32_state", "bf16_moments"])
def test_fsdp2_run_resumes_bit_identically_from_a_dcp_checkpoint(tmp_path, moments):
    results = run_distributed(_dcp_worker, world_size=2, args=(str(tmp_path / "ckpt"), moments), timeout=180)
    for rank, r in enumerate(results):
        expected, resumed = r["expected"], r["resumed"]
        assert expected["skipped"] == resumed["skipped"] == 2, (rank, expected["skipped"], resumed["skipped"])
        for name, t in expected["params"].items():
            assert torch.equal(t, resumed["params"][name]), (rank, name)
        for key, t in expected["optim"].items():
            if key != "step":
                assert resumed["optim"][key].dtype == (torch.bfloat16 if moments else torch.float32), (rank, key)
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(resumed["optim"][key])), (rank, key)
