"""torchao's quantized AdamW (8-bit, 4-bit and FP8 state) on FSDP2 shards, on 2 gloo ranks: FusedStep keeps
torchao's state on each rank's local shard (a DTensor over an ``OptimState8bit``/``OptimState4bit``/
``OptimStateFp8``, as torchao's own ``_new_buffer`` makes it), clips by the global norm and checkpoints through DCP.

torchao decides per local shard whether to quantize: a shard of at least 4096 elements in whole blocks of 256.
The model's weights cover both cases: 128x64 and 64x128 (4096 elements per rank: quantized) and 64x64 (2048 per
rank: plain float32 state on the shards, though the whole param would be quantized); the biases are plain.
Every rank sees the same data, so FSDP2's averaged grads are the unsharded model's exactly.

References (never our code), 6 steps, clipping active on the even ones:

* **torchao's own step on the same FSDP2 shards**: torch's clip and torchao's ``step()`` on a twin sharded
  model, every param and state tensor of every rank;
* **the unsharded torchao run**: the same on a twin unsharded model, for a model whose every weight shard keeps
  the state form the whole weight keeps (its last layer 128x64, not 64x64). Each rank's codes and scales are
  compared with the reference's rows and blocks of its shard: a shard of whole blocks has the whole param's
  blocks.

The references clip with ``clip_grads_with_norm_`` given FusedStep's norm of the step, and torch's own norm of
their grads (``get_total_norm``) is checked against FusedStep's (``rtol=1e-5``: its partial sums are added
in another order on two ranks). Clipping each run by its own norm instead lets those last bits change the
clip coefficient, and through the model every later grad: measured, 0.44% of a moment's codes apart after
6 steps against the unsharded run, one by 2, params 8e-4 apart. With the norm shared, the unsharded run
agrees to 3e-8 with no code apart.

Tolerances, as in ``tests/test_torchao_quantized.py``: codes equal except at most 0.1% one apart (the clip
coefficient, float64 rounded to float32 here, float32 ops in torch, may differ in its last bit and move a
value across a rounding boundary of the map; measured: one code per rank against torchao's sharded run,
none against the unsharded one); params within ``rtol=1e-5, atol=1e-6`` but for at most 0.1% of their
elements (a flipped code's), and all within ``lr / 10``; scales and plain state within ``rtol=1e-5`` and
1e-5 of the tensor's largest value.

* **DCP**: save after 3 steps (``get_state_dict`` and FusedStep as a ``Stateful``), train 3 more, resume a
  fresh model from the checkpoint and train the same 3: params and every state tensor bit-identical
  (tolerance 0: the same computation on the same values), each quantized moment still torchao's state class
  inside a DTensor.

FusedStep runs eagerly here (``compile=False``), and torchao's steps with ``torch.compile`` replaced by the
identity (its ``single_param_adam`` runs eagerly): what this tests is the sharded layout, adoption, the
global norm and checkpoints. The compiled update's parity with compiled torchao is
``tests/test_torchao_quantized.py``'s; compiling each shape on each of 2 ranks would cost minutes of each
torch version's suite.
"""

from __future__ import annotations

import pytest
import torch

from .harness import run_distributed

pytest.importorskip("torchao.optim")

LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 1.0
CODE_FLIPS = 1e-3
TOL = dict(rtol=1e-5, atol=1e-6)


def _model(last: int = 64) -> torch.nn.Module:
    """Weights 128x64, 64x128 and ``last``x64 (64: a shard of 2048 elements, plain state; 128: quantized)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64),
                               torch.nn.Tanh(), torch.nn.Linear(64, last))


def _loss(model, step: int) -> torch.Tensor:
    """The same data on every rank; large grads (clipped at MAX_NORM) on even steps, small ones on odd steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 40.0 if step % 2 == 0 else 1e-3
    return (model(torch.randn(16, 64, generator=gen)) ** 2).mean() * scale


def _sharded(mesh, last: int = 64):
    from torch.distributed.fsdp import fully_shard

    model = _model(last)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, fused, steps) -> list[float]:
    norms = []
    for step in steps:
        _loss(model, step).backward()
        norms.append(float(fused.step()))
        fused.zero_grad()
    return norms


def _codes(state) -> torch.Tensor:
    """A quantized state tensor's codes, one integer per element: 4-bit codes unpacked (the even element's in
    the high nibble), FP8 codes as their bits; a flat ``[numel / 2]`` 4-bit tensor unpacks to the elements'
    order, so a shard's codes are the whole param's rows either way."""
    codes = state.codes
    if codes.dtype == torch.float8_e4m3fn:
        return codes.view(torch.uint8).int()
    if type(state).__name__ == "OptimState4bit":
        return torch.stack([codes >> 4, codes & 0b1111], dim=-1).reshape(-1).int()
    return codes.int()


def _local_state(opt, model) -> dict:
    """Each param's state on this rank: the codes and scales of a quantized moment, else the local tensor."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state[p].items():
            local = value.to_local() if hasattr(value, "to_local") else value
            if hasattr(local, "codes"):  # torchao's state class
                out[f"{name}/{key}/codes"] = _codes(local)
                out[f"{name}/{key}/scale"] = local.scale.clone()
            else:
                out[f"{name}/{key}"] = local.detach().clone()
    return out


FORMATS = {"8bit": ("AdamW8bit", "OptimState8bit"), "4bit": ("AdamW4bit", "OptimState4bit"),
           "fp8": ("AdamWFp8", "OptimStateFp8")}


def _adamw(fmt: str):
    import torchao.optim

    return getattr(torchao.optim, FORMATS[fmt][0])


def _eager_torchao():
    """torchao's steps call ``torch.compile(single_param_adam, fullgraph=True)``: the identity runs it eagerly."""
    from unittest import mock

    return mock.patch("torch.compile", lambda fn, **kwargs: fn)


def _torchao_train(model, opt, steps, fused_norms: list[float]) -> list[float]:
    """torchao's own step after torch's clip. The grads are clipped by torch's ``clip_grads_with_norm_`` with
    FusedStep's norm of the same step, and torch's own norm of them (``get_total_norm``) is returned to be
    checked against FusedStep's: so the two runs share the clip coefficient's input, and a last-bit difference
    of the norm (its partial sums are added in another order) is not carried through the model into every
    later grad, where it flips codes at random (measured: 0.44% of a moment's codes after 6 steps, one by 2)."""
    norms = []
    with _eager_torchao():
        for step, fused_norm in zip(steps, fused_norms):
            _loss(model, step).backward()
            grads = [p.grad for p in model.parameters()]
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), MAX_NORM, torch.tensor(fused_norm))
            opt.step()
            opt.zero_grad()
    return norms


def _worker(rank: int, world_size: int, checkpoint: str, fmt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from compiled_step import FusedStep

    AdamW = _adamw(fmt)

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    model = _sharded(mesh)
    opt = AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile=False, model_parts=[model], compile_notice=False)
    norms = _train(model, fused, range(0, 3))
    state_types = {name: {key: (type(v).__name__, type(v.to_local()).__name__ if isinstance(v, DTensor) else None)
                          for key, v in opt.state[p].items()} for name, p in model.named_parameters()}
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "fused": fused}, checkpoint_id=checkpoint)
    norms += _train(model, fused, range(3, 6))
    expected = {"params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                "state": _local_state(opt, model)}

    twin = _sharded(mesh)
    twin_opt = AdamW(twin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    twin_norms = _torchao_train(twin, twin_opt, range(6), norms)
    torchao_sharded = {"norms": twin_norms, "state": _local_state(twin_opt, twin),
                       "params": {n: p.full_tensor().detach().clone() for n, p in twin.named_parameters()}}

    model2 = _sharded(mesh)
    with torch.no_grad():  # a different starting point: everything must come from the checkpoint
        for p in model2.parameters():
            p.add_(1.0)
    opt2 = AdamW(model2.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    fused2 = FusedStep(opt2, max_grad_norm=MAX_NORM, compile=False, model_parts=[model2], compile_notice=False)
    # get_state_dict fills a fresh optimizer's state with its own step at lr 0 (``_init_optim_state``):
    # torchao 0.18's compiled step fails there on the CPU with 4-bit DTensor state ("wrong number of
    # dimensions") and FP8 ("'OptimStateFp8' object has no attribute 'qmap'"), so it runs eagerly; FusedStep
    # never calls torchao's step.
    with _eager_torchao():
        model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    state = {"model": model_sd2, "optim": optim_sd2, "fused": fused2}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model2, fused2, range(3, 6))
    resumed = {"params": {n: p.full_tensor().detach().clone() for n, p in model2.named_parameters()},
               "state": _local_state(opt2, model2),
               "state_types": {name: {key: (type(v).__name__, type(v.to_local()).__name__)
                                      for key, v in opt2.state[p].items() if key != "step"}
                               for name, p in model2.named_parameters()}}
    # A model whose every weight shard is whole blocks of 4096 elements: its state has the unsharded run's form.
    aligned = _sharded(mesh, last=128)
    aligned_opt = AdamW(aligned.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    aligned_fused = FusedStep(aligned_opt, max_grad_norm=MAX_NORM, compile=False, model_parts=[aligned],
                              compile_notice=False)
    aligned_run = {"norms": _train(aligned, aligned_fused, range(6)), "state": _local_state(aligned_opt, aligned),
                   "params": {n: p.full_tensor().detach().clone() for n, p in aligned.named_parameters()}}
    return {"norms": norms, "expected": expected, "resumed": resumed, "state_types": state_types,
            "torchao_sharded": torchao_sharded, "aligned": aligned_run}


def _reference(fmt: str, last: int, fused_norms: list[float]):
    """torchao's own step after torch's clip on the unsharded model."""
    model = _model(last)
    opt = _adamw(fmt)(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    norms = _torchao_train(model, opt, range(6), fused_norms)
    return model, opt, norms


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def _assert_codes_close(ours, ref, what):
    diff = (ours.int() - ref.int()).abs()
    flips = int((diff != 0).sum())
    assert int(diff.max()) <= 1 and flips <= CODE_FLIPS * diff.numel(), f"{what}: {flips} codes differ"


def _assert_values_close(ours, ref, what):
    """Within ``rtol=1e-5`` and 1e-5 of the tensor's largest |value|: the norm's last bits, carried through the
    model into later grads, move every value by ~1e-6 relative; a flipped code moves its one element more."""
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _assert_params_close(ours, ref, what):
    """At most CODE_FLIPS of the elements beyond ``TOL`` (a flipped code's element), none beyond ``lr / 10``."""
    beyond = ~torch.isclose(ours, ref, **TOL)
    assert int(beyond.sum()) <= CODE_FLIPS * ours.numel(), f"{what}: {int(beyond.sum())} elements beyond TOL"
    torch.testing.assert_close(ours, ref, rtol=0, atol=LR / 10, msg=lambda m: f"{what}: {m}")


def _assert_state_close(ours: dict, ref: dict, what):
    assert ours.keys() == ref.keys(), what
    for key, t in ours.items():
        if key.endswith("/codes"):
            _assert_codes_close(t, ref[key], (what, key))
        else:
            _assert_values_close(t, ref[key], (what, key))


QUANTIZED_SHARDS = ("0.weight", "2.weight")  # 4096 elements per rank; 4.weight's 2048 keep plain state


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fsdp2_torchao_state_matches_torchao_sharded_and_unsharded_and_resumes_from_dcp(tmp_path, fmt):
    world = 2
    results = run_distributed(_worker, world_size=world, args=(str(tmp_path / "ckpt"), fmt), timeout=300)
    for rank, r in enumerate(results):
        ref_model, ref_opt, ref_norms = _reference(fmt, 128, r["aligned"]["norms"])
        assert ref_norms[0] > MAX_NORM and ref_norms[1] < MAX_NORM  # clipping active on some steps only
        # torchao's state form on every rank, decided by the shard: quantized moments in DTensors for the
        # shards of 4096 elements, plain ones for the rest (torchao's own sharded run agrees below).
        for name, types in r["state_types"].items():
            local = FORMATS[fmt][1] if name in QUANTIZED_SHARDS else "Tensor"
            assert types["exp_avg"] == types["exp_avg_sq"] == ("DTensor", local), (rank, name, types)
        expected, sharded = r["expected"], r["torchao_sharded"]
        # Against torchao's own step on the same shards: everything.
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(sharded["norms"]), rtol=1e-5, atol=0)
        _assert_state_close(expected["state"], sharded["state"], f"rank {rank} vs torchao sharded")
        for name, t in expected["params"].items():
            _assert_params_close(t, sharded["params"][name], f"rank {rank} {name} vs torchao sharded")
        # Against the unsharded run, on the model whose shards keep the whole params' state form: this rank's
        # rows of the codes, its blocks of the scales.
        aligned = r["aligned"]
        torch.testing.assert_close(torch.tensor(aligned["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        for name, q in ref_model.named_parameters():
            _assert_params_close(aligned["params"][name], q.detach(), f"rank {rank} {name} vs unsharded")
            for key, ref in ref_opt.state[q].items():
                what = f"rank {rank} {name} {key} vs unsharded"
                if key == "step":
                    assert float(aligned["state"][f"{name}/step"]) == float(ref) == 6.0, what
                elif hasattr(ref, "codes"):
                    _assert_codes_close(aligned["state"][f"{name}/{key}/codes"], _rows(_codes(ref), rank, world),
                                        what)
                    _assert_values_close(aligned["state"][f"{name}/{key}/scale"], _rows(ref.scale, rank, world), what)
                else:
                    _assert_values_close(aligned["state"][f"{name}/{key}"], _rows(ref, rank, world), what)
        # DCP: the resumed run is the uninterrupted one, bit for bit, in torchao's state form.
        resumed = r["resumed"]
        assert resumed["state_types"] == {n: {k: t for k, t in types.items() if k != "step"}
                                          for n, types in r["state_types"].items()}
        for name, t in expected["params"].items():
            assert torch.equal(t, resumed["params"][name]), (rank, name)
        assert expected["state"].keys() == resumed["state"].keys()
        for key, t in expected["state"].items():
            assert torch.equal(t, resumed["state"][key]), (rank, key)
