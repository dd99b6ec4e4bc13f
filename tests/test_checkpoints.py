"""Checkpoints of a model FusedStep trains, with default options, through every tool that writes them.

With ``flat_params=True`` (the default) every plain param lives in a flat buffer. Each still has a
storage object of its own, covering exactly its bytes (``storage.own_storage_alias``), so the tools
that group tensors by storage see separate tensors: ``torch.save`` writes each param's bytes only,
safetensors' ``save_model``/``load_model`` accept them, transformers' ``save_pretrained`` finds
nothing shared to clone. (Accelerate's ``save_state``/``save_model`` are in tests/integrations/.)

Reference: the tools' own loaders, on a model of the same architecture that FusedStep never saw;
every round trip is bit-identical (tolerance 0: they copy bytes).
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from compiled_step import FusedStep


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _trained(model, steps=2):
    """Train ``model`` a few steps with FusedStep, default options; returns the FusedStep."""
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0, compile_notice=False)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        fused.step()
        fused.zero_grad()
    return fused


@pytest.fixture(scope="module")
def llama():
    model = _llama()
    fused = _trained(model)
    assert fused.plan.describe()[0].endswith("in 21 rows") or "21 aliased" in fused.plan.describe()[0], \
        fused.plan.describe()  # every param was moved into the flat buffer
    return model


def _saved_size(obj) -> tuple[int, bytes]:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue()), buffer.getvalue()


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_each_flat_param_has_a_storage_of_its_own_covering_exactly_its_bytes(llama):
    storages = set()
    for name, p in llama.named_parameters():
        storage = p.untyped_storage()
        assert storage.data_ptr() == p.data_ptr(), name
        assert storage.nbytes() == p.numel() * p.element_size(), name
        storages.add(storage.data_ptr())
    assert len(storages) == 21


@pytest.mark.parametrize("submodule", ["", "lm_head", "model.layers.1.mlp"])
def test_torch_save_round_trips_bit_identically_at_the_plain_size(llama, submodule):
    module = llama.get_submodule(submodule)
    size, data = _saved_size(module.state_dict())
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    _assert_same_tensors(loaded, module.state_dict())
    # The same module without FusedStep: its own fresh copy, same architecture and dtypes.
    plain = {k: v.clone() for k, v in module.state_dict().items()}
    plain_size, _ = _saved_size(plain)
    assert size <= 1.05 * plain_size, (size, plain_size)
    fresh = _llama(seed=1).get_submodule(submodule)
    fresh.load_state_dict(loaded)
    _assert_same_tensors(fresh.state_dict(), module.state_dict())


def test_safetensors_save_file_and_load_file(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    path = os.fspath(tmp_path / "model.safetensors")
    save_file(llama.state_dict(), path)
    loaded = load_file(path)
    assert len(loaded) == 21
    _assert_same_tensors(loaded, llama.state_dict())


def test_safetensors_save_model_and_load_model_into_a_fresh_and_the_live_model(llama, tmp_path):
    from safetensors.torch import load_model, save_model

    path = os.fspath(tmp_path / "model.safetensors")
    save_model(llama, path)
    fresh = _llama(seed=1)
    missing, unexpected = load_model(fresh, path)
    assert not missing and not unexpected
    _assert_same_tensors(fresh.state_dict(), llama.state_dict())
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with torch.no_grad():
        for p in llama.parameters():
            p.add_(1.0)  # the load must write every weight back
    load_model(llama, path)  # what Accelerate's in-place resume calls
    _assert_same_tensors(llama.state_dict(), before)


def _allocated_during(fn) -> int:
    """Bytes of CPU memory allocated by torch ops while ``fn`` runs (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events())


def test_save_pretrained_round_trips_without_copying_the_params(llama, tmp_path):
    from transformers import LlamaForCausalLM

    fresh = _llama(seed=1)
    fresh.load_state_dict(llama.state_dict())  # same values, separate plain tensors: the baseline
    baseline = _allocated_during(lambda: fresh.save_pretrained(tmp_path / "plain"))
    ours = _allocated_during(lambda: llama.save_pretrained(tmp_path / "fused"))
    param_bytes = sum(p.numel() * p.element_size() for p in llama.parameters())
    # transformers clones tensors that share a storage before saving: that would be param_bytes more.
    assert ours <= baseline + param_bytes // 10, (ours, baseline, param_bytes)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "fused")
    _assert_same_tensors(loaded.state_dict(), llama.state_dict())
