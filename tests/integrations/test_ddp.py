"""DDP recipe (README, "Where you train"): both sides of the diff run as written on 2 gloo ranks.

Reference: the script before the change, i.e. DDP with torch's clip_grad_norm_ and torch.optim.AdamW, and
torch.save/torch.load for the checkpoint. Tolerance: recipes.RTOL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from distributed.harness import run_distributed  # noqa: E402

from . import recipes  # noqa: E402


def _snapshot(namespace: dict, name: str) -> dict:
    model, optimizer, history = recipes.result(namespace, name)
    return {"params": {n: p.detach().clone() for n, p in model.state_dict().items()},
            "moments": recipes.adam_moments(optimizer, model), "history": history}


def _bucket_view_copies(config, batches, *, named: bool) -> list[int]:
    """gradient_as_bucket_view=True: DDP points p.grad at its buckets in every backward. With the DDP module
    in model_parts FusedStep reads the grads there; without, it copies them in at every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaForCausalLM

    from compiled_step import FusedOptimizer

    torch.manual_seed(0)
    model = DDP(LlamaForCausalLM(config), gradient_as_bucket_view=True)
    optimizer = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=0.5,
                               model_parts=[model] if named else ())
    copies = []
    for batch in batches[:4]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        copies.append(len(optimizer.last_step_copied_grads))
    return copies


def _worker(rank: int, world_size: int, directory: str) -> dict:
    recipe = recipes.recipe("ddp")
    out = {}
    for side in ("before", "after"):
        observed = recipes.Observed()
        with observed.watching():
            namespace = recipes.run_script(getattr(recipe, side), f"README.md:{recipe.line} ({side})",
                                           Path(directory) / side)
        out[side] = {name: _snapshot(namespace, name) for name in ("full", "resumed")}
        out[side]["observed"] = (observed.norm_calls, observed.copies)
    batches = recipes.prelude()["batches"]
    out["bucket_view_copies"] = [_bucket_view_copies(recipes.tiny_config(), batches, named=named)
                                 for named in (False, True)]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_distributed(_worker, world_size=2, args=(str(tmp_path_factory.mktemp("ddp")),), timeout=300)


def test_recipe_changes_at_most_three_lines():
    recipe = recipes.recipe("ddp")
    assert recipe.changed == 3, recipe.changed_lines


def test_fused_optimizer_matches_ddp_with_clip_grad_norm(ranks):
    for rank in ranks:
        eager, fused = rank["before"]["full"], rank["after"]["full"]
        assert min(norm for _, norm in eager["history"]) > 0.5, "max_grad_norm must clip every step"
        for (e_loss, e_norm), (f_loss, f_norm) in zip(eager["history"], fused["history"], strict=True):
            assert abs(e_norm - f_norm) <= recipes.RTOL * e_norm and abs(e_loss - f_loss) <= recipes.RTOL * e_loss
        differences = [recipes.relative_difference(fused["params"][n], p) for n, p in eager["params"].items()]
        assert max(differences) <= recipes.RTOL
    # The ranks' weights agree: DDP averaged the grads and FusedStep clipped by the same norm on each.
    rank0, rank1 = (rank["after"]["full"]["params"] for rank in ranks)
    assert all(torch.equal(rank0[n], p) for n, p in rank1.items())


def test_no_second_norm_pass_and_no_grad_copies(ranks):
    for rank in ranks:
        eager_calls, _ = rank["before"]["observed"]
        fused_calls, copies = rank["after"]["observed"]
        assert eager_calls == 12 and fused_calls == 0, (eager_calls, fused_calls)  # clips: 6 + 3 + 3 steps
        assert copies == [0] * 12, copies  # the reducer copies into FusedStep's views (gradient_as_bucket_view=False)


def test_gradient_as_bucket_view_needs_the_model_in_model_parts(ranks):
    """What the README says about gradient_as_bucket_view=True: without model_parts every step after the
    first copies the 21 grads in; with model_parts=[model] none."""
    for rank in ranks:
        unnamed, named = rank["bucket_view_copies"]
        assert unnamed[1:] == [21, 21, 21] and named[1:] == [0, 0, 0], (unnamed, named)


def test_resume_from_torch_save_checkpoint_restores_adamw_moments(ranks):
    for rank in ranks:
        full, resumed = rank["after"]["full"], rank["after"]["resumed"]
        assert resumed["history"] == full["history"][3:]
        # Bit-identical: the same steps on the same state and data. Moments restarted would differ at once.
        assert recipes.max_moment_difference(resumed["moments"], full["moments"]) == 0.0
        assert all(torch.equal(resumed["params"][n], p) for n, p in full["params"].items())
