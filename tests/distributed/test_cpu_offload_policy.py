"""FusedStep under FSDP2's CPUOffloadPolicy: params and grads live on the CPU and the update runs there.

On this CPU-only machine the mesh is a gloo CPU mesh, so the partials need no device hop; on a GPU
machine the same code moves them to the mesh's device type for NCCL (``collectives._all_reduce``).
References, both written by torch: eager FSDP2 under the same policy (``clip_grad_norm_`` over the DTensor params,
whose norm torch reduces across ranks, then ``torch.optim.AdamW``), and the same model unsharded in one process,
``clip_grad_norm_`` + ``AdamW`` on the global batch. Tolerance: fp32; reduce-scatter averages in another order than a
single backward, and FusedStep's norm is accumulated in float64, so ~1e-7 differences: norm rtol 1e-6, params
atol 1e-6.
"""

import torch

from .harness import run_distributed


def _worker(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from compiled_step import FusedStep

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    eager.load_state_dict(model.state_dict())
    for sharded in (model, eager):
        for module in (sharded[0], sharded[2], sharded):
            fully_shard(module, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=0.1, model_parts=[model], compile=False, bucket_size=4, pack_threshold=20)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    norms = []
    for step in range(3):
        x = torch.randn(4 * world, 8, generator=torch.Generator().manual_seed(step))
        model(x[rank * 4:(rank + 1) * 4]).square().mean().backward()  # FSDP averages the per-rank means
        ours = fused.step()
        fused.zero_grad()
        eager(x[rank * 4:(rank + 1) * 4]).square().mean().backward()
        eager_norm = torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.1)  # a DTensor, reduced across ranks
        eager_opt.step()
        eager_opt.zero_grad()
        ref(x).square().mean().backward()
        theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        ref_opt.zero_grad()
        norms.append((float(ours), float(theirs), float(eager_norm.full_tensor())))
    devices = {p.to_local().device.type for p in model.parameters()}
    diff = max((p.full_tensor() - r).abs().max().item() for p, r in zip(model.parameters(), ref.parameters()))
    eager_diff = max((p.full_tensor() - q.full_tensor()).abs().max().item()
                     for p, q in zip(model.parameters(), eager.parameters()))
    return {"norms": norms, "devices": sorted(devices), "diff": diff, "eager_diff": eager_diff}


def test_fused_step_under_cpu_offload_policy_matches_eager_reference():
    for result in run_distributed(_worker, world_size=2, timeout=120):
        assert result["devices"] == ["cpu"]
        for ours, theirs, eager in result["norms"]:
            assert abs(ours - theirs) <= 1e-6 * theirs, result["norms"]
            assert abs(ours - eager) <= 1e-6 * eager, result["norms"]
        assert result["diff"] <= 1e-6, result
        assert result["eager_diff"] <= 1e-6, result
