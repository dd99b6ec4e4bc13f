"""The README's "Where you train" recipes, run as written, and what the tests observe while they run.

A recipe is a ```diff block after an ``<!-- recipe: NAME -->`` marker: `` `` (context) and ``-`` lines are the
user's script before the change, context and ``+`` lines the script after it. Both are executed, the
"before" script being the reference (the trainer's own clipping and ``torch.optim.AdamW``).

The scripts use what a user's script would already have: ``config`` (a tiny ``LlamaConfig``: 2 layers,
hidden size 32, 21 tensors, built from the config so nothing is downloaded), ``train_dataset`` (48 rows of
16 random token ids, labels = inputs), ``batches`` (the same rows as 6 batches of 8) and
``train_loader`` (the first 24 rows in batches of 8, not shuffled: 3 steps per epoch).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiled_step import FusedStep

README = Path(__file__).resolve().parents[2] / "README.md"
_RECIPE = re.compile(r"<!-- recipe: (\w+) -->\n```diff\n(.*?)```", re.S)

# Relative tolerance of a FusedStep run against the same trainer's eager run (the brief's bound). Measured
# differences are ~1e-7: FusedStep's norm is accumulated in fp64 and its update fused (README, "Known
# differences"), so each step's params differ by an ulp or two from eager's.
RTOL = 1e-5


@dataclass
class Recipe:
    name: str
    line: int  # README line of the diff's first line
    before: str
    after: str
    changed: int  # per run of consecutive -/+ lines, the larger of the removed and added counts
    changed_lines: list[str] = field(default_factory=list)


def recipe(name: str) -> Recipe:
    text = README.read_text()
    for match in _RECIPE.finditer(text):
        if match.group(1) == name:
            return _parse(name, text[: match.start(2)].count("\n") + 1, match.group(2))
    raise LookupError(f"README.md has no <!-- recipe: {name} --> diff block")


def recipe_names() -> list[str]:
    return [m.group(1) for m in _RECIPE.finditer(README.read_text())]


def _parse(name: str, line: int, diff: str) -> Recipe:
    before, after, changed_lines = [], [], []
    changed, removed, added = 0, 0, 0
    for raw in diff.splitlines() + [" "]:  # a final context line closes the last hunk
        mark, code = (raw[:1], raw[1:]) if raw else (" ", "")
        if mark not in " +-":
            raise ValueError(f"README recipe {name}: a diff line must start with ' ', '+' or '-': {raw!r}")
        if mark == " ":
            changed += max(removed, added)
            removed = added = 0
        else:
            changed_lines.append(raw)
            removed, added = removed + (mark == "-"), added + (mark == "+")
        if mark != "+":
            before.append(code)
        if mark != "-":
            after.append(code)
    return Recipe(name, line, "\n".join(before[:-1]) + "\n", "\n".join(after[:-1]) + "\n", changed, changed_lines)


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def prelude() -> dict:
    """What the recipe scripts take from the user's own code."""
    rows = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(0))
    train_dataset = [{"input_ids": r, "labels": r} for r in rows]
    batches = [{"input_ids": rows[i:i + 8], "labels": rows[i:i + 8]} for i in range(0, 48, 8)]
    train_loader = torch.utils.data.DataLoader(train_dataset[:24], batch_size=8)
    return {"config": tiny_config(), "train_dataset": train_dataset, "batches": batches, "train_loader": train_loader}


def run_script(code: str, where: str, directory: Path, namespace: dict | None = None) -> dict:
    """Execute ``code`` in ``directory`` (scripts write checkpoints next to them); returns its namespace.

    An exception the script raises is kept in the namespace: what the script assigned before it stays
    checkable, and ``result()`` re-raises it for what it did not get to assign.
    """
    namespace = {**prelude(), "__directory__": directory, **(namespace or {})}
    directory.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(code, where, "exec"), namespace)
    except Exception as error:  # noqa: BLE001 -- re-raised by result()
        namespace["__error__"] = error
    finally:
        os.chdir(cwd)
    return namespace


def run_both(name: str, tmp_path_factory) -> tuple[Recipe, dict, dict, "Observed", "Observed"]:
    """Run recipe ``name``'s script before the change, then after it, each watched (``Observed``)."""
    recipe_ = recipe(name)
    eager, fused = Observed(), Observed()
    with eager.watching():
        before = run_script(recipe_.before, f"README.md:{recipe_.line} (before)", tmp_path_factory.mktemp("eager"))
    with fused.watching():
        after = run_script(recipe_.after, f"README.md:{recipe_.line} (after)", tmp_path_factory.mktemp("fused"))
    return recipe_, before, after, eager, fused


def result(namespace: dict, name: str):
    """``namespace[name]``, or the exception that stopped the script before it assigned ``name``."""
    if name not in namespace:
        error = namespace.get("__error__")
        raise AssertionError(f"the recipe script stopped before assigning {name!r}: {error!r}") from error
    return namespace[name]


class Observed:
    """What a run did besides its results: norm passes made by the trainer and FusedStep's copies.

    ``norm_calls`` counts calls of ``torch.nn.utils.clip_grad_norm_`` and ``torch.nn.utils.get_total_norm``
    (what Lightning, Accelerate and HF Trainer call for their clipping and their logged norm; torch's
    ``clip_grad_norm_`` calls ``get_total_norm`` through its own module, so a clip counts once);
    ``clip_norms`` holds the norms ``clip_grad_norm_`` returned. ``copies`` holds
    ``len(fused.last_step_copied_grads)`` after every ``FusedStep.step()``.
    """

    def __init__(self):
        self.norm_calls = 0
        self.clip_norms: list[float] = []
        self.copies: list[int] = []

    @contextlib.contextmanager
    def watching(self):
        utils = torch.nn.utils
        clip, total, step = utils.clip_grad_norm_, utils.get_total_norm, FusedStep.step

        def clip_spy(*args, **kwargs):
            self.norm_calls += 1
            norm = clip(*args, **kwargs)
            self.clip_norms.append(float(norm))
            return norm

        def total_spy(*args, **kwargs):
            self.norm_calls += 1
            return total(*args, **kwargs)

        def step_spy(fused, *args, **kwargs):
            out = step(fused, *args, **kwargs)
            self.copies.append(len(fused.last_step_copied_grads))
            return out

        utils.clip_grad_norm_, utils.get_total_norm, FusedStep.step = clip_spy, total_spy, step_spy
        try:
            yield self
        finally:
            utils.clip_grad_norm_, utils.get_total_norm, FusedStep.step = clip, total, step


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denominator = b.norm()
    return float((a - b).norm() / denominator) if denominator > 0 else float((a - b).norm())


def max_param_difference(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    pairs = list(zip(model_a.state_dict().items(), model_b.state_dict().items()))
    assert pairs and all(ka == kb for (ka, _), (kb, _) in pairs), "the models' parameter names differ"
    return max(relative_difference(a, b) for (_, a), (_, b) in pairs)


def adam_moments(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state per parameter name: exp_avg, exp_avg_sq and step."""
    names = {id(p): n for n, p in model.named_parameters()}
    while not isinstance(optimizer, torch.optim.AdamW):
        optimizer = optimizer.optimizer  # Accelerate's and FusedOptimizer's wrappers
    return {names[id(p)]: {k: v.detach().clone() for k, v in s.items()} for p, s in optimizer.state.items()}


def max_moment_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) == 21, (len(a), len(b))
    return max(relative_difference(a[n][k], b[n][k]) for n in a for k in ("exp_avg", "exp_avg_sq", "step"))
