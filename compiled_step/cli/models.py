"""A small decoder-only transformer and a learnable synthetic token stream for the demo.

Nothing here needs a download: the model is built from a seed and the data is sampled from a
fixed random Markov chain that is itself built from a seed. The chain has a known entropy rate,
so the demo can print how far the loss is from the best possible loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "PRESETS", "TinyGPT", "MarkovData", "build_model", "param_groups"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Size of the built-in language model. Validated on construction."""

    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ModelConfig.vocab_size must be at least 2, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# `tiny` is for tests (about 0.1 M params, compiles and trains in seconds). `small` is the demo's
# default: about 1.9 M params, big enough that the optimizer step is a visible share of the step
# time on a CPU, small enough that 40 steps of two copies finish in well under a minute on 2 cores.
# `tiny` ties the head to the embedding and `small` does not, so the demo exercises both: a tied
# weight is one parameter that receives gradient from two places.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=64, seq_len=32, d_model=64, n_layers=2, n_heads=4, tie_embeddings=True),
    "small": ModelConfig(vocab_size=256, seq_len=64, d_model=192, n_layers=4, n_heads=6, tie_embeddings=False),
}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        # Bias-free linears and weight-only norms, as in most current LMs. The params are still of
        # several shapes (2-D matrices, 1-D norm weights), which is what the optimizer step sees.
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyGPT(nn.Module):
    """Decoder-only LM: token + learned position embedding, pre-norm blocks, final norm, head."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        # The layers' constructors run their own default init from the global RNG, which
        # reset_parameters then overwrites; fork_rng keeps that throwaway init from moving the
        # caller's RNG state, so building a model has no effect on anything else.
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
            # A ModuleList (not Sequential) so FSDP can shard each block as its own unit.
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm_f = nn.LayerNorm(cfg.d_model, bias=False)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)
        if cfg.tie_embeddings:
            # Tie after init: the head then shares the embedding's initial values, and
            # parameters() yields the shared tensor once.
            self.head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from `seed` that leaves the global RNG alone.

        Uses its own CPU generator, so the same seed gives bit-identical weights whatever the
        global RNG state or the device the model later moves to.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = 0.02
        # GPT-2 style: shrink the init of the projections that write into the residual stream so
        # its variance does not grow with depth.
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:  # norm weights
                p.fill_(1.0)
            elif name.endswith(("proj.weight", "fc2.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * resid_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) int64 tokens, T <= seq_len. Returns logits (B, T, V), or the mean
        next-token cross-entropy (0-d) when targets (B, T) are given."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_model(preset_or_cfg: str | ModelConfig, *, seed: int = 0) -> TinyGPT:
    """Build the model from a preset name or a ModelConfig, on CPU, deterministically."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"unknown model preset {preset_or_cfg!r}; choose one of {sorted(PRESETS)}")
        preset_or_cfg = PRESETS[preset_or_cfg]
    return TinyGPT(preset_or_cfg, seed=seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The usual two groups: weight decay on matrices, none on norm weights and embeddings.

    Two groups with different hyperparameters also make the demo exercise an optimizer with
    more than one param group, as real training does.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # a tied weight is listed once by named_parameters, but be safe
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "emb" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class MarkovData:
    """Token stream from a fixed random first-order Markov chain over `vocab_size` tokens.

    Each token has `branching` possible successors with random (seeded) probabilities, so a model
    that learns the bigram table reaches the chain's entropy rate, far below ln(vocab_size): the
    loss falls visibly within tens of steps. The chain is a pure function of `seed`; batches are
    drawn from a separate generator the caller owns, so two consumers of the same generator seed
    see the same batches.
    """

    def __init__(self, vocab_size: int, seq_len: int, *, seed: int = 0, branching: int = 4) -> None:
        if vocab_size < 2 or seq_len < 1:
            raise ValueError(f"need vocab_size >= 2 and seq_len >= 1, got {vocab_size}, {seq_len}")
        if not 1 <= branching <= vocab_size:
            raise ValueError(f"branching must be in [1, vocab_size={vocab_size}], got {branching}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # Each row: `branching` random successors; logits with std 1 give uneven but not
        # degenerate probabilities.
        succ = torch.stack([torch.randperm(vocab_size, generator=gen)[:branching] for _ in range(vocab_size)])
        probs = torch.softmax(torch.randn(vocab_size, branching, generator=gen, dtype=torch.float64), dim=-1)
        self.transition = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
        self.transition.scatter_(1, succ, probs)

    def entropy_rate(self) -> float:
        """Entropy (nats/token) of the next token under the chain's stationary distribution:
        the lowest mean cross-entropy any model can reach on long sequences."""
        # Power iteration from uniform; mixing a little uniform keeps it well defined even if
        # the random chain happens to be periodic or reducible.
        p = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        for _ in range(500):
            p = 0.99 * (p @ self.transition) + 0.01 / self.vocab_size
        t = self.transition
        row_entropy = -(t * torch.where(t > 0, t.log(), torch.zeros_like(t))).sum(dim=1)
        return float((p * row_entropy).sum())

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64 on CPU; targets are inputs shifted by one."""
        tokens = torch.empty(batch_size, self.seq_len + 1, dtype=torch.int64)
        tokens[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=generator)
        for i in range(self.seq_len):
            tokens[:, i + 1] = torch.multinomial(self.transition[tokens[:, i]], 1, generator=generator).squeeze(1)
        return tokens[:, :-1], tokens[:, 1:]
