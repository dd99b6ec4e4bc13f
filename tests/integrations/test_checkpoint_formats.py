"""What the README's "Flat params" paragraph says about checkpoint writers, checked on a model whose
params FusedStep moved into its flat buffer: safetensors 0.8's save_file and save_model/load_model,
torch.save of one param, transformers' save_pretrained. References: the weights themselves (bit-equal
after a round trip) and the writers' own loaders.
"""

from __future__ import annotations

import io

import pytest
import torch

st = pytest.importorskip("safetensors.torch")
pytest.importorskip("transformers")

from transformers import LlamaForCausalLM  # noqa: E402

from compiled_step import FusedOptimizer  # noqa: E402

from . import recipes  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = LlamaForCausalLM(recipes.tiny_config())
    optimizer = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=0.5)
    batch = recipes.prelude()["batches"][0]
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    flat = optimizer.fused.plan.groups[0]
    assert len(model.state_dict()) == 21 and len(flat.params) == 21  # all moved into one flat buffer
    return model, optimizer, batch


def _fresh():
    torch.manual_seed(1)
    return LlamaForCausalLM(recipes.tiny_config())


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_save_file_round_trips(trained, tmp_path):
    model = trained[0]
    st.save_file(model.state_dict(), tmp_path / "w.safetensors")
    assert _equal(st.load_file(tmp_path / "w.safetensors"), model.state_dict())


def test_safetensors_save_model_and_load_model_round_trip(trained, tmp_path):
    """save_model needs each storage covered by one tensor: every param must have a storage of its own."""
    model, optimizer, batch = trained
    st.save_model(model, tmp_path / "m.safetensors")
    other = _fresh()
    st.load_model(other, tmp_path / "m.safetensors")
    assert _equal(other.state_dict(), model.state_dict())
    # Loading into the live model writes into FusedStep's buffer, and training goes on from there.
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    st.load_model(model, tmp_path / "m.safetensors")
    assert _equal(model.state_dict(), expected)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert len(optimizer.fused.last_step_copied_grads) == 0


def test_torch_save_of_one_param_writes_its_own_bytes(trained):
    model = trained[0]
    weight = model.lm_head.weight
    one, whole = io.BytesIO(), io.BytesIO()
    torch.save(model.lm_head.state_dict(), one)
    torch.save(weight.detach().clone(), whole)
    assert one.getbuffer().nbytes < whole.getbuffer().nbytes + 1024  # not the 21 params' buffer
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def test_save_pretrained_round_trips(trained, tmp_path):
    model = trained[0]
    model.save_pretrained(tmp_path / "pretrained")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "pretrained")
    assert _equal(loaded.state_dict(), model.state_dict())
