"""HF Trainer recipe (README, "Where you train"): both sides of the diff run as written.

Reference: the script before the change, i.e. transformers' own Trainer (its clip_grad_norm_ and
torch.optim.AdamW), and its own checkpoint loader for the resume. Tolerance: recipes.RTOL.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from compiled_step import FusedOptimizer  # noqa: E402
from compiled_step.integrations.transformers import FusedTrainer  # noqa: E402

from . import recipes  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return recipes.run_both("hf_trainer", tmp_path_factory)


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def test_recipe_changes_at_most_three_lines(runs):
    recipe = runs[0]
    assert recipe.changed == 2 <= 3, recipe.changed_lines


def test_fused_trainer_matches_eager_trainer(runs):
    _, before, after, _, _ = runs
    eager, fused = recipes.result(before, "trainer"), recipes.result(after, "trainer")
    assert isinstance(fused.optimizer.optimizer, FusedOptimizer)
    assert eager.state.global_step == fused.state.global_step == 6
    eager_norms, fused_norms = _logged(eager, "grad_norm"), _logged(fused, "grad_norm")
    assert len(eager_norms) == len(fused_norms) == 6
    assert min(eager_norms) > 0.5, "the recipe's max_grad_norm must clip every step for this test to mean something"
    for e, f in zip(eager_norms, fused_norms):
        assert abs(e - f) <= recipes.RTOL * abs(e), (eager_norms, fused_norms)
    for e, f in zip(_logged(eager, "loss"), _logged(fused, "loss")):
        assert abs(e - f) <= recipes.RTOL * abs(e)
    assert recipes.max_param_difference(eager.model, fused.model) <= recipes.RTOL


def test_no_second_norm_pass_and_no_grad_copies(runs):
    _, _, _, eager, fused = runs
    assert eager.norm_calls == 9, eager.norm_calls  # the spy sees Trainer's clip once a step (6 steps, then 3)
    assert fused.norm_calls == 0
    assert len(fused.copies) == 9  # 6 steps, then 3 resumed
    # The first step of each run moves the grads autograd allocated into FusedStep's buffers (uncounted);
    # after that Trainer's model.zero_grad() leaves None grads, which must be re-pointed, not copied.
    assert fused.copies[1:6] == [0] * 5 and fused.copies[7:] == [0] * 2, fused.copies


def test_checkpoint_holds_adamw_moments_and_fused_counters(runs):
    after = runs[2]
    state = torch.load(after["__directory__"] / "out/checkpoint-3/optimizer.pt", weights_only=True)
    assert len(state["state"]) == 21 and {"exp_avg", "exp_avg_sq", "step"} <= set(state["state"][0])
    assert set(state["fused_step"]) == {"skipped_steps", "last_step_finite"}
    assert all(float(s["step"]) == 3 for s in state["state"].values())


def test_resume_restores_adamw_moments(runs):
    _, before, after, _, _ = runs
    full, resumed = recipes.result(after, "trainer"), recipes.result(after, "resumed")
    assert resumed.state.global_step == 6
    # Bit-identical: the same steps on the same state and data (Trainer's own resume is bit-identical too).
    # Moments restarted at the resume would differ at once.
    full_moments = recipes.adam_moments(full.optimizer, full.model)
    assert recipes.max_moment_difference(recipes.adam_moments(resumed.optimizer, resumed.model), full_moments) == 0.0
    assert recipes.max_param_difference(resumed.model, full.model) == 0.0
    # and the same resume with Trainer as the reference
    eager_resumed = recipes.result(before, "resumed")
    assert recipes.max_param_difference(resumed.model, eager_resumed.model) <= recipes.RTOL



def _trainer(tmp_path, optimizer_for=None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(recipes.tiny_config())
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to="none")
    optimizers = (optimizer_for(model), None) if optimizer_for else (None, None)
    return FusedTrainer(model=model, args=args, train_dataset=recipes.prelude()["train_dataset"], optimizers=optimizers)


def test_optimizer_passed_in_is_wrapped_and_a_conflicting_max_grad_norm_refused(tmp_path):
    trainer = _trainer(tmp_path, lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, FusedOptimizer) and optimizer.config.max_grad_norm == 1.0  # args' default
    trainer = _trainer(tmp_path, lambda model: FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3)))
    with pytest.raises(ValueError, match=r"clips at max_grad_norm=None, but TrainingArguments\(max_grad_norm=1.0\)"):
        trainer.create_optimizer()


def test_fused_trainer_refuses_a_transformers_without_the_overridden_methods(tmp_path, monkeypatch):
    monkeypatch.delattr(Trainer, "_get_grad_norm")
    with pytest.raises(RuntimeError, match=r"overrides Trainer\._get_grad_norm\(self, model, grad_norm\).*lacks.*"
                                           r"transformers==5\.25\.0"):
        _trainer(tmp_path)
