"""Lightning recipe (README, "Where you train"): both sides of the diff run as written, plus
``configure_optimizers`` returning a FusedOptimizer without the callback.

Reference: the script before the change, i.e. Lightning's own gradient_clip_val (torch's
clip_grad_norm_, whose returned norms the spy records) and torch.optim.AdamW; Lightning's own
checkpointing for the resume. Tolerance: recipes.RTOL.
"""

from __future__ import annotations

import csv

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from compiled_step import FusedOptimizer  # noqa: E402
from compiled_step.integrations.lightning import FusedStepCallback  # noqa: E402

from . import recipes  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return recipes.run_both("lightning", tmp_path_factory)


def _logged_norms(namespace, trainer) -> list[float]:
    with open(namespace["__directory__"] / trainer.logger.log_dir / "metrics.csv") as f:
        return [float(row["grad_norm"]) for row in csv.DictReader(f) if row.get("grad_norm")]


def test_recipe_changes_at_most_three_lines(runs):
    assert runs[0].changed == 2 <= 3, runs[0].changed_lines


def test_callback_matches_lightning_clipping(runs):
    _, before, after, eager, fused = runs
    eager_trainer, eager_module = recipes.result(before, "full")
    fused_trainer, fused_module = recipes.result(after, "full")
    assert eager_trainer.global_step == fused_trainer.global_step == 6
    assert all(isinstance(o, FusedOptimizer) for o in fused_trainer.optimizers)
    eager_norms = eager.clip_norms[:6]  # the full run's clips: what Lightning's clip_grad_norm_ returned
    assert min(eager_norms) > 0.5, "the recipe's gradient_clip_val must clip every step for this test to mean something"
    fused_norms = _logged_norms(after, fused_trainer)
    assert len(fused_norms) == 6
    for e, f in zip(eager_norms, fused_norms):
        assert abs(e - f) <= recipes.RTOL * abs(e), (eager_norms, fused_norms)
    assert recipes.max_param_difference(eager_module, fused_module) <= recipes.RTOL
    assert fused_trainer.gradient_clip_val == 0.5  # restored after the run


def test_no_second_norm_pass_and_no_grad_copies(runs):
    _, _, _, eager, fused = runs
    assert eager.norm_calls == 9, eager.norm_calls  # Lightning's clip once a step: 6, then 3 resumed
    assert fused.norm_calls == 0
    assert len(fused.copies) == 9
    # Lightning zeroes through optimizer.zero_grad(), which FusedOptimizer does in place; only the first
    # step of each run moves autograd's grads in (uncounted).
    assert fused.copies == [0] * 9, fused.copies


def test_resume_through_ckpt_path_counts_steps_and_restores_moments(runs):
    """Lightning's resume (here: a replayed first batch, see below) is the reference: the FusedStep side
    resumed from its checkpoint must reach what the Trainer-clipping side resumed from its own reaches.
    Moments not restored would differ at the first resumed step."""
    _, before, after, _, _ = runs
    full, _ = recipes.result(after, "full")
    resumed, resumed_module = recipes.result(after, "resumed")
    assert full.global_step == 6 and resumed.global_step == 6 and resumed.optimizers[0].steps == 3
    eager_resumed, eager_module = recipes.result(before, "resumed")
    moments = recipes.adam_moments(resumed.optimizers[0], resumed_module)
    eager_moments = recipes.adam_moments(eager_resumed.optimizers[0], eager_module)
    assert recipes.max_moment_difference(moments, eager_moments) <= recipes.RTOL
    assert recipes.max_param_difference(resumed_module, eager_module) <= recipes.RTOL
    checkpoint = torch.load(after["__directory__"] / "full/epoch=0-step=3.ckpt", weights_only=False)
    state = checkpoint["optimizer_states"][0]
    assert checkpoint["global_step"] == 3 and len(state["state"]) == 21
    assert all(float(s["step"]) == 3 for s in state["state"].values())
    assert set(state["fused_step"]) == {"skipped_steps", "last_step_finite"}
    # Lightning 2.6.6 resumes this end-of-epoch checkpoint with one more batch of epoch 0 from a new
    # iterator (batch_idx 3 = the first batch again), so neither side equals its uninterrupted run.
    assert recipes.max_param_difference(eager_module, recipes.result(before, "full")[1]) > 1e-3


def test_configure_optimizers_may_return_a_fused_optimizer(tmp_path):
    """Without the callback: Lightning steps and counts the FusedOptimizer (max_steps is respected) and its
    checkpoint resumes as AdamW's does under the same Trainer (the reference: AdamW with Lightning's clip)."""
    config = recipes.tiny_config()
    loader = recipes.prelude()["train_loader"]

    class LitLM(pl.LightningModule):
        def __init__(self, fused):
            super().__init__()
            torch.manual_seed(0)
            from transformers import LlamaForCausalLM

            self.model, self.fused = LlamaForCausalLM(config), fused

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            adamw = torch.optim.AdamW(self.parameters(), lr=1e-3)
            return FusedOptimizer(adamw, max_grad_norm=0.5) if self.fused else adamw

    def fit(fused, max_steps, ckpt_path=None):
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             gradient_clip_val=None if fused else 0.5,
                             callbacks=[pl.callbacks.ModelCheckpoint(tmp_path / str(fused), save_top_k=-1)])
        module = LitLM(fused)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer, module

    full, full_module = fit(True, 6)  # two epochs of 3 steps, a checkpoint at the end of each
    assert full.global_step == 6 and full.optimizers[0].steps == 6
    resumed, resumed_module = fit(True, 6, ckpt_path=tmp_path / "True/epoch=0-step=3.ckpt")
    assert resumed.global_step == 6 and resumed.optimizers[0].steps == 3
    eager_full, eager_full_module = fit(False, 6)
    eager_resumed, eager_module = fit(False, 6, ckpt_path=tmp_path / "False/epoch=0-step=3.ckpt")
    assert recipes.max_param_difference(full_module, eager_full_module) <= recipes.RTOL
    assert recipes.max_param_difference(resumed_module, eager_module) <= recipes.RTOL


def test_callback_refuses_value_clipping_and_conflicting_max_grad_norm(tmp_path):
    with pytest.raises(ValueError, match="clips by norm"):
        pl.Trainer(max_steps=1, gradient_clip_val=0.5, gradient_clip_algorithm="value", logger=False,
                   callbacks=[FusedStepCallback()]).fit(_TinyModule(), _tiny_loader())
    with pytest.raises(ValueError, match="takes max_grad_norm from"):
        FusedStepCallback(max_grad_norm=1.0)


class _TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_loader():
    return torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4)
