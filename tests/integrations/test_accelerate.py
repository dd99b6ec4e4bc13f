"""Accelerate recipe (README, "Where you train"): both sides of the diff run as written.

Reference: the script before the change, i.e. Accelerate's clip_grad_norm_ and torch.optim.AdamW, and
Accelerate's own save_state/load_state/save_model with their default safe_serialization=True.
Tolerance: recipes.RTOL.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from compiled_step import FusedOptimizer  # noqa: E402

from . import recipes  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return recipes.run_both("accelerate", tmp_path_factory)


def test_recipe_changes_at_most_three_lines(runs):
    assert runs[0].changed == 3, runs[0].changed_lines


def test_fused_optimizer_matches_accelerate_clipping(runs):
    _, before, after, _, _ = runs
    eager_model, _, eager_history = recipes.result(before, "full")
    fused_model, optimizer, fused_history = recipes.result(after, "full")
    assert isinstance(optimizer.optimizer, FusedOptimizer) and len(eager_history) == len(fused_history) == 6
    assert min(norm for _, norm in eager_history) > 0.5, "max_grad_norm must clip every step for this to mean something"
    for (e_loss, e_norm), (f_loss, f_norm) in zip(eager_history, fused_history):
        assert abs(e_norm - f_norm) <= recipes.RTOL * e_norm and abs(e_loss - f_loss) <= recipes.RTOL * e_loss
    assert recipes.max_param_difference(eager_model, fused_model) <= recipes.RTOL


def test_no_second_norm_pass_and_no_grad_copies(runs):
    _, _, _, eager, fused = runs
    assert eager.norm_calls == 12, eager.norm_calls  # Accelerate's clip once a step: 6, 3, then 3 resumed
    assert fused.norm_calls == 0
    # AcceleratedOptimizer.zero_grad passes set_to_none=True: the grads become None, and the next backward puts
    # them back into FusedStep's buffers (grad_restore.py). The first step of each run moves autograd's grads in
    # (uncounted).
    assert fused.copies == [0] * 12, fused.copies


def test_save_state_and_load_state_resume_with_adamw_moments(runs):
    _, _, after, _, _ = runs
    full_model, full_optimizer, full_history = recipes.result(after, "full")
    model, optimizer, history = recipes.result(after, "resumed")
    assert history == full_history[3:]  # the same losses and norms from step 4 on
    # Bit-identical: the same steps on the same state and data. Moments restarted would differ at once.
    assert recipes.max_moment_difference(recipes.adam_moments(optimizer, model),
                                         recipes.adam_moments(full_optimizer, full_model)) == 0.0
    assert recipes.max_param_difference(model, full_model) == 0.0


def test_safetensors_checkpoints_hold_every_weight(runs):
    """save_state and save_model (safe_serialization=True) write all 21 tensors, each with its values."""
    _, _, after, _, _ = runs
    model = recipes.result(after, "full")[0]
    expected = {name: p.detach() for name, p in model.named_parameters()}
    for path in ("full/model.safetensors", "full/model/model.safetensors"):
        saved = safetensors_torch.load_file(after["__directory__"] / path)
        assert saved.keys() == expected.keys(), (path, sorted(set(expected) - set(saved)))
        assert all(torch.equal(saved[name], expected[name]) for name in expected), path
