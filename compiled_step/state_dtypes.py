"""Adam's moments in another precision than the params: bfloat16 moments for float32 params, float32 moments for
bfloat16 params.

* **bfloat16 moments of float32 params.** torchtitan's ``bf16_optimizer_states`` and DeepSeek-V3 keep Adam's
  moments in bfloat16 (4 bytes per param instead of 8): ``bf16_moments(optimizer)``.
* **float32 moments of bfloat16 params.** A model trained in bfloat16 without float32 master weights keeps the
  moments in float32 (DeepSpeed's CPU Adam does by default, ``fp32_optimizer_states``); torch.optim would make
  them bfloat16 like the params: ``fp32_moments(optimizer)``.

The user makes the moments so, with those functions or by filling ``optimizer.state`` themselves as torchtitan's
step pre-hook does; FusedStep then keeps each state key in the dtype its tensors have (``state_dtypes``: the
sharding group's buffer for that key is made in it), computes in float32 and rounds to nearest on store
(``rules.common.store_where``), as CUDA's fused Adam kernel does with bfloat16 moments.

Which keys may differ: a rule's ``LOW_PRECISION_KEYS`` (Adam's moments), in the pairs ``MOMENT_DTYPES`` lists; float32
moments of bfloat16 params only on an optimizer given ``fp32_moments`` (otherwise they are what ``model.to(bfloat16)``
after the state was made leaves). Any other state of another dtype than its param is refused, as torch refuses it.

Loading: ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its param's dtype, so
a resume would silently make bfloat16 moments float32 again (torchtitan #4615), and round float32 moments of
bfloat16 params to bfloat16. ``keep_saved_state_dtypes`` registers load hooks on the optimizer that put back the
checkpoint's own tensors, for those keys and where allowed: nothing is rounded on the way. An optimizer not given
``fp32_moments`` loads float32 moments of bfloat16 params as torch loads them, rounded to bfloat16.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim.optimizer import _get_scalar_dtype

from compiled_step import planning
from compiled_step.rules import rule_for

LOW_PRECISION = torch.bfloat16
# (param dtype, moment dtype) pairs the moments (a rule's LOW_PRECISION_KEYS) may have besides the param's own:
# bfloat16 moments of float32 params, float32 moments of bfloat16 params. A float64 param computes in float64
# (rules.common.compute_dtype): its state stays float64.
MOMENT_DTYPES = ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32))
_PARAM_DTYPES = (torch.float32, torch.bfloat16)  # the params whose moments may be made bfloat16 or float32
_HOOKED = "_compiled_step_keeps_saved_state_dtypes"


# Set on an optimizer by ``fp32_moments``: float32 moments of its bfloat16 params are the user's choice. Without it
# they are what ``model.to(torch.bfloat16)`` after the state was made leaves, which torch.optim refuses, and so do we.
_WIDENED = "_compiled_step_fp32_moments"


def allowed(rule, key: str, param_dtype: torch.dtype, state_dtype: torch.dtype, widened: bool = False) -> bool:
    """Whether state ``key`` of a ``param_dtype`` param may be kept in ``state_dtype``; ``widened``: the optimizer
    was given ``fp32_moments``."""
    if state_dtype == param_dtype:
        return True
    if key not in rule.LOW_PRECISION_KEYS or (param_dtype, state_dtype) not in MOMENT_DTYPES:
        return False
    return state_dtype != torch.float32 or widened


def state_dtypes(plan: planning.Plan, optimizers: list[torch.optim.Optimizer], rules: list
                 ) -> list[dict[str, torch.dtype]]:
    """Per sharding group, the state keys kept in another dtype than the params (``{key: dtype}``), read from
    the state the optimizer holds; ``optimizers[g]`` is group g's optimizer, ``rules[g]`` its rule.

    Raises ``ValueError`` before anything changes for state of a dtype the rule does not allow (the param's
    dtype changed after its state was made: ``model.to(dtype)``; torch.optim raises at its next step too), and
    for one key in two dtypes in one sharding group (one buffer per key holds one dtype).
    """
    out = []
    for group, optimizer, rule in zip(plan.groups, optimizers, rules):
        seen: dict[str, dict[torch.dtype, str]] = {}
        widened = getattr(optimizer, _WIDENED, False)
        for p, name in zip(group.params, group.names):
            for key, value in optimizer.state.get(p, {}).items():
                if key == rule.STEP_KEY or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    continue
                if not allowed(rule, key, p.dtype, value.dtype, widened):
                    raise ValueError(
                        f"{name} is {p.dtype} but its optimizer state {key!r} is {value.dtype}: the param's dtype "
                        "changed after its state was created (model.to(dtype)?). torch.optim raises at its next "
                        "step too. Cast before creating the optimizer, or load the state again with "
                        "optimizer.load_state_dict(), which casts it to the params' dtype"
                        + (" (float32 moments for bfloat16 params: compiled_step.fp32_moments(optimizer))"
                           if key in rule.LOW_PRECISION_KEYS and (p.dtype, value.dtype) in MOMENT_DTYPES else "")
                        + ". Nothing was changed.")
                seen.setdefault(key, {}).setdefault(value.dtype, name)
        lowered = {}
        for key, dtypes in seen.items():
            if len(dtypes) > 1:
                (a, first), (b, second) = list(dtypes.items())[:2]
                raise ValueError(
                    f"{group.label}: optimizer state {key!r} in {str(a).removeprefix('torch.')} and "
                    f"{str(b).removeprefix('torch.')} ({first}, {second}): FusedStep keeps one key of a param "
                    "group in one buffer of one dtype. Make every param's state of the group the same dtype "
                    "(compiled_step.bf16_moments and fp32_moments do). Nothing was changed.")
            dtype = next(iter(dtypes))
            if dtype != group.key.dtype:
                lowered[key] = dtype
        out.append(lowered)
    return out


def keep_saved_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep the moments a checkpoint holds in another dtype than the params
    (``MOMENT_DTYPES``) instead of casting them to the params' dtype: the checkpoint's own tensors are put back,
    moved to the param's device if need be, never rounded. Once per optimizer; other keys and dtypes are loaded as
    torch loads them."""
    if getattr(optimizer, _HOOKED, False):
        return
    rule = rule_for(optimizer)
    if not rule.LOW_PRECISION_KEYS:
        return
    saved: list[dict[str, torch.Tensor]] = []  # per param position in the checkpoint: its moments

    def record(opt, state_dict):
        saved.clear()
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for pid in ids:
            st = state_dict["state"].get(pid, {})
            saved.append({k: v for k, v in st.items() if k in rule.LOW_PRECISION_KEYS and isinstance(v, torch.Tensor)
                          and v.dtype in _PARAM_DTYPES})
        return None

    def put_back(opt):
        params = chain.from_iterable(g["params"] for g in opt.param_groups)  # paired by position, as torch pairs
        for p, tensors in zip(params, saved):
            st = opt.state.get(p)
            for key, value in tensors.items():
                if (st is not None and key in st and st[key].dtype != value.dtype
                        and allowed(rule, key, p.dtype, value.dtype, getattr(opt, _WIDENED, False))):
                    # the checkpoint's values, not torch's cast of them (a float32 moment cast to a bfloat16
                    # param's dtype and back would have lost its low bits)
                    st[key] = value.to(device=st[key].device)
        saved.clear()

    optimizer.register_load_state_dict_pre_hook(record)
    optimizer.register_load_state_dict_post_hook(put_back)
    setattr(optimizer, _HOOKED, True)


def bf16_moments(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Keep ``optimizer``'s moments (Adam/AdamW: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) in bfloat16.

    Every param's state is made now, as torch.optim's ``_init_group`` makes it at a param's first grad but with
    bfloat16 moments (state that already exists is cast once), so that a checkpoint loader that fills the
    optimizer's existing state (DCP's ``get_state_dict``/``dcp.load``) loads into bfloat16 tensors instead of
    first running an eager step to make float32 ones. A param that never gets a grad keeps zeros at step 0,
    which the step skips as torch does. A step pre-hook does the same for params added later
    (``add_param_group``) at their first grad, and the load hooks of ``keep_saved_state_dtypes`` keep a
    checkpoint's bfloat16 moments bfloat16. Returns ``optimizer``. Raises ``TypeError`` for optimizers other
    than Adam and AdamW and ``ValueError`` for params other than float32 or bfloat16, before anything changes.

    ``FusedStep`` steps such state; eager ``optimizer.step()`` does on CUDA with ``fused=True`` only.
    """
    return _keep_moments_in(optimizer, torch.bfloat16, "bf16_moments")


def fp32_moments(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Keep ``optimizer``'s moments (Adam/AdamW) in float32 for bfloat16 params, as DeepSpeed's CPU Adam keeps them
    (torch.optim would make them bfloat16, like the params): 8 bytes of state per param instead of 4, and moments
    that do not lose the small updates bfloat16 rounds away. Float32 params keep theirs float32 already.

    Made and kept like ``bf16_moments``'s: every param's state now, a step pre-hook for params added later, load
    hooks that keep a checkpoint's float32 moments float32 (torch's ``load_state_dict`` would round them to
    bfloat16). The optimizer is marked: FusedStep accepts float32 moments of bfloat16 params from it only (elsewhere
    they are what ``model.to(torch.bfloat16)`` after the state was made leaves, refused as torch refuses it); a
    resume recreates the optimizer with ``fp32_moments`` before loading. Returns ``optimizer``. Raises ``TypeError`` for optimizers other than Adam and AdamW and
    ``ValueError`` for params other than bfloat16 or float32, before anything changes.

    ``FusedStep`` steps such state: it computes in float32, stores the moments as they are and rounds the params to
    bfloat16 (to nearest, or stochastically with ``stochastic_rounding="params"``). Eager torch.optim on the CPU
    refuses moments of another dtype than the grads.
    """
    return _keep_moments_in(optimizer, torch.float32, "fp32_moments")


def _keep_moments_in(optimizer: torch.optim.Optimizer, dtype: torch.dtype, name: str) -> torch.optim.Optimizer:
    rule = rule_for(optimizer)
    if not rule.LOW_PRECISION_KEYS:
        raise TypeError(f"{name} covers torch.optim.Adam and AdamW (their moments); got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    wrong = sorted({str(p.dtype) for p in params if p.dtype not in _PARAM_DTYPES})
    if wrong:
        raise ValueError(f"{name} keeps the moments of float32 or bfloat16 params; got {', '.join(wrong)} "
                         "params (float64 params compute and keep their state in float64)")

    def make_state(opt, args=(), kwargs=None, everywhere=False):
        for group in opt.param_groups:
            keys = rule.state_keys(rule.variant(opt, group))
            for p in group["params"]:
                if (p.grad is None and not everywhere) or opt.state.get(p):
                    continue
                st = opt.state[p]
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                for key in keys:
                    st[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return None

    with torch.no_grad():
        for st in optimizer.state.values():
            for key in rule.LOW_PRECISION_KEYS:
                if key in st:
                    st[key] = st[key].to(dtype)
    make_state(optimizer, everywhere=True)
    optimizer.register_step_pre_hook(make_state)
    if dtype == torch.float32:
        setattr(optimizer, _WIDENED, True)
    keep_saved_state_dtypes(optimizer)
    return optimizer
