"""HF Trainer with ``TrainingArguments(optim="adamw_torch_8bit")`` or ``"adamw_torch_4bit"``: transformers builds
torchao's ``AdamW8bit`` or ``AdamW4bit``, ``FusedTrainer`` wraps it in FusedStep. Reference: plain ``Trainer`` with
the same arguments (accelerate's ``clip_grad_norm_``, then torchao's own step), and Trainer's own checkpoint loader
for the resume.

Tolerance. Per step the fused update is bit-identical to torchao's on the same grads (tests/test_torchao_quantized.py),
but the clip coefficient (float64 in FusedStep, float32 in ``clip_grad_norm_``) and the norm's summation order
differ in the last bits. Through a model those ~1e-7 differences reach the next steps' grads, and an 8-bit code
whose value sits at a rounding boundary flips: measured after 4 steps, 0 to 9 codes of a moment tensor
(<= 0.11%), each moving its param's later updates by about lr times one map step, and the flip moves the next
steps' grads in turn: params differ by up to 3.6e-4 (a layer-0 down_proj element), 1.35e-4 norm-relative.
Bounds: <= 0.2% of each tensor's codes, params within ``atol = lr / 10 = 1e-3`` and 5e-4 norm-relative (a
missing clip, bias correction or decay moves params by ~lr, ~1e-2 relative), norms and losses ``rel 2e-5``.
4-bit maps have 16 entries, not 256, so one flipped code moves its element's updates 8-16x more: measured, one
flip (1 code of 8192, an ``exp_avg_sq`` of layer 1) moved a param by 1.28e-3, 5.4e-4 norm-relative. Its bounds:
``atol = lr / 4`` and 1e-3 norm-relative, still an order below what a missing clip, bias correction or decay
does. The resume is bit-identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchao")

from torchao.optim import AdamW4bit, AdamW8bit  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from compiled_step import FusedOptimizer  # noqa: E402
from compiled_step.integrations.transformers import FusedTrainer  # noqa: E402

from . import recipes  # noqa: E402

STEPS = 4
# Each optim value: torchao's optimizer transformers builds for it, its state class, and the bounds on params
# (absolute, norm-relative) explained above.
OPTIMS = {"adamw_torch_8bit": (AdamW8bit, "OptimState8bit", 1e-3, 5e-4),
          "adamw_torch_4bit": (AdamW4bit, "OptimState4bit", 2.5e-3, 1e-3)}


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _data():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (16, 12), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(cls, out, optim, resume=None, **extra):
    args = TrainingArguments(output_dir=str(out), optim=optim, max_steps=STEPS, learning_rate=1e-2,
                             per_device_train_batch_size=4, max_grad_norm=0.5, logging_steps=1, save_steps=2,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, lr_scheduler_type="constant",
                             dataloader_num_workers=0, **extra)
    trainer = cls(model=_model(), args=args, train_dataset=_data())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logged(trainer, key):
    return [e[key] for e in trainer.state.log_history if key in e and "train_runtime" not in e]


def _codes(state):
    """A quantized state tensor's codes, one per element (4-bit codes unpacked from their bytes)."""
    if type(state).__name__ == "OptimState4bit":
        return torch.stack([state.codes >> 4, state.codes & 0b1111], dim=-1)
    return state.codes


@pytest.fixture(scope="module", params=list(OPTIMS))
def runs(request, tmp_path_factory):
    optim = request.param
    eager = _train(Trainer, tmp_path_factory.mktemp("eager"), optim)
    fused_dir = tmp_path_factory.mktemp("fused")
    fused = _train(FusedTrainer, fused_dir, optim)
    resumed = _train(FusedTrainer, fused_dir, optim, resume=str(fused_dir / "checkpoint-2"))
    return optim, eager, fused, resumed


def test_low_bit_optim_trains_like_plain_trainer(runs):
    optim, eager, fused, _ = runs
    optimizer_type, state_class, atol, norm_relative = OPTIMS[optim]
    assert isinstance(fused.optimizer.optimizer, FusedOptimizer)
    assert type(fused.optimizer.optimizer.optimizer) is optimizer_type
    quantized = [v for st in fused.optimizer.optimizer.optimizer.state.values() for v in st.values()
                 if type(v).__name__ == state_class]
    assert len(quantized) >= 8  # the 64x64 and 64x128 matrices keep quantized moments
    eager_norms, fused_norms = _logged(eager, "grad_norm"), _logged(fused, "grad_norm")
    assert len(eager_norms) == len(fused_norms) == STEPS and min(eager_norms) > 0.5  # clipped every step
    for e, f in zip(eager_norms, fused_norms):
        assert f == pytest.approx(e, rel=2e-5)
    for e, f in zip(_logged(eager, "loss"), _logged(fused, "loss")):
        assert f == pytest.approx(e, rel=2e-5)
    assert recipes.max_param_difference(fused.model, eager.model) <= norm_relative
    for (name, p), q in zip(eager.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    eager_state, fused_state = eager.optimizer.optimizer.state, fused.optimizer.optimizer.optimizer.state
    for st, st2 in zip(eager_state.values(), fused_state.values()):
        for key, value in st.items():
            if type(value).__name__ == state_class:
                flips = int((_codes(value) != _codes(st2[key])).sum())
                assert flips <= 0.002 * _codes(value).numel(), (key, flips)


def test_resume_from_a_fused_low_bit_checkpoint_is_bit_identical(runs):
    optim, _, fused, resumed = runs
    state_class = OPTIMS[optim][1]
    assert resumed.state.global_step == STEPS
    for p, q in zip(fused.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    full = fused.optimizer.optimizer.optimizer.state
    again = resumed.optimizer.optimizer.optimizer.state
    for (p, st), (q, st2) in zip(full.items(), again.items()):
        for key in st:
            a, b = st[key], st2[key]
            if type(a).__name__ == state_class:
                assert type(b).__name__ == state_class
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
            else:
                assert torch.equal(a, b), key
