"""Sharding-aware grad norm, clip and update of FusedStep on real gloo processes (world 2 and 4).

The scenarios (``_workers_norms.SCENARIOS``) cover FSDP2 ``fully_shard`` Shard(0), TP Shard +
Replicate on a 2-D (dp, tp) mesh, HSDP, PP with different layers per stage (plain and FSDP per
stage), EP with stacked experts [n_experts, d_in, d_out] on dim 0 (DTensors on moe_mesh, and plain
per-rank tensors found by name pattern / ``mark_experts``), EP + FSDP2 on separate meshes and on
one 2-D mesh, many separate meshes, Partial grads, empty local shards, uneven param counts per rank,
grads on some ranks only, norm types 2, 1, inf and 3, and 1e30 / 1e-30 magnitudes.

Each scenario runs FusedStep(compile=False, bucket_size=4) for two steps (SGD with momentum, or
AdamW) and, once ``compiled_step.nemo_compat`` exists, NeMo Automodel's functional API on a fresh copy.
The reference is torch only: every grad materialised (``full_tensor()`` / gathered from the ranks),
concatenated, ``torch.linalg.vector_norm``; then an eager ``torch.optim`` step on the full tensors
after clipping by that norm. Tolerances and their reasons are stated in ``_workers_common``.

All scenarios of one world size run in one spawn shared with ``test_scaling.py``
(``_workers_common.results``); the tests below only assert on the returned records.
"""

from __future__ import annotations

import pytest

from . import _workers_common as common
from ._workers_norms import SCENARIOS

_FUNCTIONAL = [(sc.name, fn) for sc in SCENARIOS for fn in sc.functional]


def _world(name: str) -> list[dict]:
    return common.results(common.scenario(name).world_size)


@pytest.mark.parametrize("name", [sc.name for sc in SCENARIOS])
def test_norm_and_update_match_torch_reference(name):
    common.check_fused(_world(name), name)


@pytest.mark.parametrize("name", [sc.name for sc in SCENARIOS])
def test_one_all_reduce_per_process_group_per_step(name):
    common.check_collectives(_world(name), name)


@pytest.mark.parametrize("name,fn_name", _FUNCTIONAL, ids=[f"{n}-{f}" for n, f in _FUNCTIONAL])
def test_functional_api_matches_torch_reference(name, fn_name):
    world = _world(name)
    if not world[0]["__functional_api__"]:
        pytest.skip("compiled_step.nemo_compat is not there yet")
    common.check_functional(world, name, fn_name)


def test_matrix_covers_both_world_sizes_and_every_norm_type():
    """The matrix itself: a guard against a scenario silently dropping out of it."""
    assert {sc.world_size for sc in SCENARIOS} == {2, 4}
    assert {sc.norm_type for sc in SCENARIOS} == {1.0, 2.0, float("inf"), 3.0}
    assert any(sc.magnitude == 1e-30 for sc in SCENARIOS) and any(sc.options.get("gmag") == 1e30 for sc in SCENARIOS)


def test_reference_detects_a_wrong_norm():
    """Negative control of the checker: the same records with one rank's norm off by 1e-9
    relative, or one param nudged by 1e-4, must fail."""
    name = "fsdp_w2_p2"
    world = _world(name)
    tampered = [dict(r) for r in world]
    rec = dict(tampered[1][name])
    rec["steps"] = [dict(s) for s in rec["steps"]]
    rec["steps"][0]["norm"] = rec["steps"][0]["norm"] * (1 + 1e-9)
    tampered[1][name] = rec
    with pytest.raises(AssertionError, match="ranks disagree"):
        common.check_fused(tampered, name)
    for r in tampered:
        r[name] = dict(r[name])
        r[name]["steps"] = [dict(s) for s in r[name]["steps"]]
        r[name]["steps"][0]["norm"] = world[0][name]["steps"][0]["norm"] * (1 + 1e-9)
    with pytest.raises(AssertionError, match="vs reference"):
        common.check_fused(tampered, name)
    for rank, r in enumerate(tampered):
        r[name] = dict(world[rank][name])
        r[name]["steps"] = [dict(s) for s in r[name]["steps"]]
        after = dict(r[name]["steps"][0]["after"])
        after["0.weight"] = after["0.weight"] + 1e-4
        r[name]["steps"][0]["after"] = after
    with pytest.raises(AssertionError):
        common.check_fused(tampered, name)
