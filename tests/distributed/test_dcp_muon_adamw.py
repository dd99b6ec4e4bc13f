"""Distributed checkpointing of an FSDP2 run with FusedStep([muon, adamw]) on 2 gloo ranks.

Muon updates the row-sharded matrices (whole, on their owner ranks), AdamW the biases, under one norm.
Save with ``torch.distributed.checkpoint`` (``get_state_dict(model, [muon, adamw])`` and FusedStep as a
``Stateful``), keep training, then resume a fresh model, both optimizers and FusedStep from the
checkpoint and train the same steps: params, both optimizers' state and the skip counter must be
bit-identical to the uninterrupted run's (tolerance 0: the same computation on the same values).
"""

from __future__ import annotations

import torch

from .harness import run_distributed
from .test_dcp import _model  # the same FSDP2 model as the one-optimizer DCP test


def _optimizers(model):
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    return [torch.optim.Muon(matrices, lr=2e-2, weight_decay=0.1),
            torch.optim.AdamW(vectors, lr=1e-2, weight_decay=0.1)]


def _train(model, fused, steps, rank):
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
        (model(torch.randn(16, 8, generator=gen)) ** 2).mean().mul(40).backward()
        if step in (1, 4):  # a skipped step before the checkpoint (its count must be restored) and one after
            next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
        fused.step()
        fused.zero_grad()


def _snapshot(model, optimizers, fused) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _, optim_sd = get_state_dict(model, optimizers)
    state = {f"{name}/{key}": (v.full_tensor() if hasattr(v, "full_tensor") else torch.as_tensor(v)).clone()
             for name, st in optim_sd["state"].items() for key, v in st.items()}
    return {"params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "state": state, "skipped": int(fused.skipped_steps)}


def _worker(rank: int, world_size: int, checkpoint: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from compiled_step import FusedStep

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    model = _model(mesh)
    optimizers = _optimizers(model)
    fused = FusedStep(optimizers, max_grad_norm=1.0, model_parts=[model], compile_notice=False)
    _train(model, fused, range(0, 3), rank)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd, "fused": fused}, checkpoint_id=checkpoint)
    _train(model, fused, range(3, 6), rank)
    expected = _snapshot(model, optimizers, fused)

    model2 = _model(mesh)
    with torch.no_grad():  # a different starting point: everything must come from the checkpoint
        for p in model2.parameters():
            p.add_(1.0)
    optimizers2 = _optimizers(model2)
    fused2 = FusedStep(optimizers2, max_grad_norm=1.0, model_parts=[model2], compile_notice=False)
    model_sd2, optim_sd2 = get_state_dict(model2, optimizers2)
    state = {"model": model_sd2, "optim": optim_sd2, "fused": fused2}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model2, optimizers2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model2, fused2, range(3, 6), rank)
    return {"expected": expected, "resumed": _snapshot(model2, optimizers2, fused2)}


def test_fsdp2_muon_and_adamw_resume_bit_identically_from_a_dcp_checkpoint(tmp_path):
    results = run_distributed(_worker, world_size=2, args=(str(tmp_path / "ckpt"),), timeout=240)
    for rank, r in enumerate(results):
        expected, resumed = r["expected"], r["resumed"]
        assert expected["skipped"] == resumed["skipped"] == 2, (rank, expected["skipped"], resumed["skipped"])
        for name, t in expected["params"].items():
            assert torch.equal(t, resumed["params"][name]), (rank, name)
        assert expected["state"].keys() == resumed["state"].keys()
        assert any(k.endswith("momentum_buffer") for k in expected["state"])  # Muon's state is in it
        assert any(k.endswith("exp_avg") for k in expected["state"])  # and AdamW's
        for key, t in expected["state"].items():
            assert torch.equal(t, resumed["state"][key]), (rank, key)
