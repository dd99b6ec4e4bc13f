"""Built-in parameter layouts for the benchmark.

A layout is only a list of named shapes: the optimizer step never looks at the model, so the benchmark
builds plain leaf tensors with ``requires_grad=True`` and assigns random grads to them. That keeps a
20 M-parameter benchmark free of any forward/backward cost and makes the tensor count and sizes, which
is what drives both the step's memory traffic and its compile time, an explicit knob.

Three families:

* :func:`gpt_layout` -- a GPT-2-style block stack (token + position embeddings, per block: 2 LayerNorms,
  fused QKV, attention projection, 4x MLP; final LayerNorm; tied LM head). This is the headline layout.
* :func:`many_small_layout` -- many tensors of a few hundred elements, where a step is all per-tensor
  overhead and no bandwidth.
* :func:`n_tensor_layout` -- exactly N tensors of varied small sizes, for compile-time measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "ParamSpec",
    "Layout",
    "gpt_layout",
    "many_small_layout",
    "n_tensor_layout",
    "make_params",
    "make_grads",
    "param_groups",
    "muon_adamw_groups",
]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, shape and whether weight decay applies (matrices yes, biases/norms no).

    ``hidden_matrix``: a 2-D weight of a hidden layer (attention and MLP projections), the params
    Muon is meant for; embeddings, biases and norms are not (a Muon + AdamW trainer gives them AdamW).
    """

    name: str
    shape: tuple[int, ...]
    decay: bool
    hidden_matrix: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """A named list of parameter specs."""

    name: str
    specs: tuple[ParamSpec, ...]

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def n_tensors(self) -> int:
        return len(self.specs)

    @property
    def largest_numel(self) -> int:
        return max(s.numel for s in self.specs)

    def describe(self) -> str:
        return f"{self.name}: {self.n_tensors} tensors, {self.n_params / 1e6:.2f} M params"


def _positive_int(name: str, value: int) -> int:
    # bool is an int subclass; True as a layer count is a caller bug, not 1 layer.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def gpt_layout(d_model: int = 512, n_layers: int = 4, vocab: int = 8192, seq_len: int = 1024) -> Layout:
    """GPT-2-style parameter shapes. The defaults give 17.4 M params in 52 tensors.

    Parameter count is roughly ``12 * n_layers * d_model**2 + (vocab + seq_len) * d_model``.
    The LM head is tied to the token embedding, as in GPT-2, so it adds no tensor.
    """
    d = _positive_int("d_model", d_model)
    _positive_int("n_layers", n_layers)
    _positive_int("vocab", vocab)
    _positive_int("seq_len", seq_len)
    specs = [ParamSpec("wte", (vocab, d), True), ParamSpec("wpe", (seq_len, d), True)]
    for i in range(n_layers):
        p = f"h{i}."
        specs += [
            ParamSpec(p + "ln_1.weight", (d,), False),
            ParamSpec(p + "ln_1.bias", (d,), False),
            ParamSpec(p + "attn.c_attn.weight", (3 * d, d), True, hidden_matrix=True),
            ParamSpec(p + "attn.c_attn.bias", (3 * d,), False),
            ParamSpec(p + "attn.c_proj.weight", (d, d), True, hidden_matrix=True),
            ParamSpec(p + "attn.c_proj.bias", (d,), False),
            ParamSpec(p + "ln_2.weight", (d,), False),
            ParamSpec(p + "ln_2.bias", (d,), False),
            ParamSpec(p + "mlp.c_fc.weight", (4 * d, d), True, hidden_matrix=True),
            ParamSpec(p + "mlp.c_fc.bias", (4 * d,), False),
            ParamSpec(p + "mlp.c_proj.weight", (d, 4 * d), True, hidden_matrix=True),
            ParamSpec(p + "mlp.c_proj.bias", (d,), False),
        ]
    specs += [ParamSpec("ln_f.weight", (d,), False), ParamSpec("ln_f.bias", (d,), False)]
    return Layout(f"gpt(d_model={d_model},n_layers={n_layers},vocab={vocab})", tuple(specs))


# Varied sizes on purpose: equal sizes would let a compiler specialise on one static shape and hide the
# dynamic-shape cost a real model pays. The cycle mixes vectors and small matrices around `base`.
_SIZE_CYCLE = (1.0, 0.75, 1.5, 0.5, 1.25, 2.0, 0.625, 1.0)


def _varied_numel(i: int, base: int) -> int:
    return max(1, int(base * _SIZE_CYCLE[i % len(_SIZE_CYCLE)]))


def many_small_layout(n_tensors: int = 1024, numel: int = 256) -> Layout:
    """``n_tensors`` 1-D tensors averaging about ``numel`` elements: a step here is pure per-tensor overhead."""
    _positive_int("n_tensors", n_tensors)
    _positive_int("numel", numel)
    specs = tuple(
        ParamSpec(f"small{i}", (_varied_numel(i, numel),), i % 2 == 0) for i in range(n_tensors)
    )
    return Layout(f"many_small(n={n_tensors},numel~{numel})", specs)


def n_tensor_layout(n_tensors: int, numel: int = 4096) -> Layout:
    """Exactly ``n_tensors`` tensors (matrices and vectors) for compile-time measurement.

    Every fourth tensor is a 2-D matrix so that flattening/striding paths are exercised, the rest are
    vectors; sizes vary around ``numel`` so a bucketed graph must be compiled with dynamic sizes.
    """
    _positive_int("n_tensors", n_tensors)
    _positive_int("numel", numel)
    specs = []
    for i in range(n_tensors):
        n = _varied_numel(i, numel)
        if i % 4 == 0:
            cols = 16
            specs.append(ParamSpec(f"w{i}", (max(1, n // cols), cols), True))
        else:
            specs.append(ParamSpec(f"b{i}", (n,), False))
    return Layout(f"n_tensors(n={n_tensors})", tuple(specs))


def make_params(
    layout: Layout, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> list[torch.Tensor]:
    """Leaf tensors with ``requires_grad=True``, initialised like a small-std transformer (N(0, 0.02))."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for spec in layout.specs:
        # Generate on CPU with a CPU generator so CPU and CUDA runs start from the same values.
        t = torch.randn(spec.shape, generator=gen, dtype=torch.float32) * 0.02
        params.append(t.to(device=device, dtype=dtype).requires_grad_(True))
    return params


def make_grads(
    layout: Layout,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 1,
    std: float = 1.0,
) -> list[torch.Tensor]:
    """Finite random grads, N(0, std). With std=1 their total 2-norm is about sqrt(n_params), so any
    max_grad_norm below that (the benchmark uses 1.0) makes clipping active."""
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be finite and > 0, got {std!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [
        (torch.randn(spec.shape, generator=gen, dtype=torch.float32) * std).to(device=device, dtype=dtype)
        for spec in layout.specs
    ]


def param_groups(
    layout: Layout, params: Sequence[torch.Tensor], *, weight_decay: float = 0.1
) -> list[dict]:
    """Two param groups, as a GPT trainer builds them: decayed matrices and undecayed biases/norms.

    Empty groups are dropped (torch.optim accepts them, but they would be noise in a benchmark)."""
    if len(params) != layout.n_tensors:
        raise ValueError(f"layout has {layout.n_tensors} specs but {len(params)} params were given")
    decay = [p for p, s in zip(params, layout.specs) if s.decay]
    no_decay = [p for p, s in zip(params, layout.specs) if not s.decay]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def muon_adamw_groups(
    layout: Layout, params: Sequence[torch.Tensor], *, weight_decay: float = 0.1
) -> tuple[list[dict], list[dict]]:
    """(Muon's param groups, AdamW's), as a Muon + AdamW trainer builds them: Muon on the hidden
    matrices (one group, decayed), AdamW on the rest (embeddings decayed, biases and norms not)."""
    if len(params) != layout.n_tensors:
        raise ValueError(f"layout has {layout.n_tensors} specs but {len(params)} params were given")
    hidden = [p for p, s in zip(params, layout.specs) if s.hidden_matrix]
    if not hidden:
        raise ValueError(f"{layout.name} has no hidden matrices for Muon")
    rest = [(p, s) for p, s in zip(params, layout.specs) if not s.hidden_matrix]
    rest_layout = Layout(layout.name, tuple(s for _, s in rest))
    return ([{"params": hidden, "weight_decay": weight_decay}],
            param_groups(rest_layout, [p for p, _ in rest], weight_decay=weight_decay))
