"""Hypothesis strategies drawing ``differential.Case``s: optimizers and hyperparameters, dtypes, shapes, groups,
clip and norm type, grad scale, non-finite grads, schedulers and lifecycle events at random steps.

``cases(...)`` takes restrictions (dtypes, optimizers, events, ...) so a search can be focused on one corner.
"""

from __future__ import annotations


from hypothesis import strategies as st

from differential import LAYOUTS, SHAPES, ZERO_STYLES, Case, Step

DTYPES = ("float64", "float32", "bfloat16", "float16")
OPTIMIZERS = ("AdamW", "Adam", "SGD")
EVENTS = ("add_param_group", "load_state_dict", "data_swap", "alias", "second_fused_step", "eager")
SCHEDULERS = (None, "StepLR", "LambdaLR", "CosineAnnealingLR", "OneCycleLR")
MAX_STEPS = 6



def shapes():
    plain = st.sampled_from(SHAPES)
    return st.one_of(plain, plain, plain, st.just(("T", (4, 3))))  # a transposed (dense, non-contiguous) param


@st.composite
def adam_options(draw, optimizer, dtype, flags=True):
    options = dict(lr=draw(st.sampled_from((1e-3, 1e-2, 1e-1))),
                   betas=draw(st.sampled_from(((0.9, 0.999), (0.8, 0.95), (0.0, 0.99)))),
                   weight_decay=draw(st.sampled_from((0.0, 0.1))),
                   amsgrad=flags and draw(st.booleans()), maximize=flags and draw(st.booleans()))
    # fp16's smallest subnormal is 6e-8: torch.optim adds eps in fp16, so eps=1e-8 becomes 0 there and a zero
    # grad gives 0/0 in the reference (eager's limitation, not FusedStep's, which adds eps in fp32).
    # Also in fp16, v = (1 - beta2) * g**2 underflows for |g| < ~1e-2 (subnormals below 6e-5), so the reference's
    # denominator sqrt(v) + eps is eps alone where FusedStep's is not; with eps = 0.1 that error stays below
    # lr * |g| / eps, within tolerance. fp16 Adam in torch.optim is fragile by itself; the draws keep it meaningful.
    options["eps"] = draw(st.sampled_from((1e-1,) if dtype == "float16" else (1e-8, 1e-6)))
    if optimizer == "Adam":
        options["decoupled_weight_decay"] = draw(st.booleans())
    return options


@st.composite
def sgd_options(draw, dampening=True):
    momentum = draw(st.sampled_from((0.0, 0.9)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov or momentum == 0 or not dampening else draw(st.sampled_from((0.0, 0.3)))
    return dict(lr=draw(st.sampled_from((1e-3, 1e-2, 1e-1))), momentum=momentum, dampening=dampening,
                nesterov=nesterov, weight_decay=draw(st.sampled_from((0.0, 0.1))), maximize=draw(st.booleans()))


def group_options(optimizer, dtype, dampening=True, flags=True):
    """One param group's hyperparameters; ``flags=False`` keeps the flags that specialise compiled graphs off."""
    return sgd_options(dampening) if optimizer == "SGD" else adam_options(optimizer, dtype, flags)


@st.composite
def events_of_a_step(draw, optimizer, dtype, events, dampening, flags):
    result = []
    for kind in draw(st.lists(st.sampled_from(events), max_size=2) if events else st.just([])):
        if kind == "add_param_group":
            options = draw(group_options(optimizer, dtype, dampening, flags))
            result.append((kind, draw(shapes()), draw(st.integers(0, 99)), options))
        elif kind == "data_swap":
            result.append((kind, draw(st.integers(0, 7))))
        elif kind == "alias":
            result.append((kind, draw(st.integers(0, 7)), draw(st.sampled_from(("detach", "state_dict")))))
        elif kind == "eager":  # switch to clip_grad_norm_ + optimizer.step() on the fused side, or back
            result.append((draw(st.sampled_from(("eager", "fused"))),))
        else:
            result.append((kind,))
    return tuple(result)


def one_step(optimizer, dtype, events, dampening, flags):
    # fp16's range ends at 65504: torch's fp16 norm (and Adam's v = g**2) overflow for large grads, where
    # FusedStep's fp64 norm does not; keep fp16 grads (times their scale) where eager fp16 is meaningful.
    magnitudes = (1.0,) if dtype == "float16" else (1e-3, 1.0, 30.0)
    scales = (None, 0.5, ("tensor", 0.25)) if dtype == "float16" else (None, 0.5, 3.0, ("tensor", 0.25))
    skips = not dampening  # see cases()
    return st.builds(Step, grad_seed=st.integers(0, 2**16), grad_magnitude=st.sampled_from(magnitudes),
                     grad_scale=st.sampled_from(scales),
                     nonfinite=st.sampled_from((None, None, None, None, "nan", "inf") if skips else (None,)),
                     inactive=st.sets(st.integers(0, 7), max_size=2 if skips else 0).map(lambda s: tuple(sorted(s))),
                     events=events_of_a_step(optimizer, dtype, events, dampening, flags),
                     zero=st.sampled_from(ZERO_STYLES))


@st.composite
def cases(draw, dtypes=DTYPES, optimizers=OPTIMIZERS, events=EVENTS, schedulers=SCHEDULERS, compile=False,
          layouts=tuple(LAYOUTS)):
    optimizer = draw(st.sampled_from(optimizers))
    dtype = draw(st.sampled_from(dtypes))
    params = tuple(draw(st.lists(shapes(), min_size=1, max_size=5)))
    n_groups = draw(st.integers(1, min(3, len(params))))
    # SGD's documented difference (README, "Known differences"): at a param's first step that applies nothing (a
    # skipped step, or no grad), FusedStep creates the momentum buffer as zeros and marks the step as first; the
    # mark does not survive a plan rebuild (seen after add_param_group) or optimizer.load_state_dict(),
    # after which the buffer is dampened as a later step's would be, where torch clones the first grad. So with
    # dampening != 0, every step applies to every param (reported to the lead: the README says only loading
    # that state into torch's SGD is affected).
    # The same mark also outlives optimizer.step() steps taken meanwhile (the "eager" event): the next fused step
    # then takes the buffer's first step again (buf = grad, dropping momentum * buf). So with SGD, "eager" events
    # come without skips too.
    dampening = optimizer == "SGD" and draw(st.booleans())
    skip_free = dampening or (optimizer == "SGD" and "eager" in events)
    # compile=True: one shared configuration of the options that specialise graphs (Adam's flags, the clip, the
    # norm type), so a few compiled examples cost a few cold graphs; values (lr, betas...) enter as tensors.
    groups = tuple(draw(group_options(optimizer, dtype, dampening, not compile)) for _ in range(n_groups))
    group_of = tuple(draw(st.integers(0, n_groups - 1)) for _ in params)
    scheduler = draw(st.sampled_from(schedulers))
    # torch's schedulers set one value per param group they were built with (torch 2.13 zips them strictly):
    # stepping one after add_param_group raises in eager torch too, so the two are not drawn together.
    events = tuple(e for e in events if not (scheduler is not None and e == "add_param_group"))
    step = one_step(optimizer, dtype, events, skip_free, not compile)  # no skips: dampening is then safe too
    steps = tuple(draw(st.lists(step, min_size=1, max_size=MAX_STEPS)))
    return Case(optimizer=optimizer, dtype=dtype, params=params, group_of=group_of, groups=groups,
                tensor_lr=draw(st.booleans()), scheduler=scheduler,
                max_grad_norm=1.0 if compile else draw(st.sampled_from((None, 1.0, 0.1))),
                norm_type=2.0 if compile else draw(st.sampled_from((2.0, 1.0, "inf", 3.0, 0.5))),
                layout=draw(st.sampled_from(layouts)),
                compile=compile, init_seed=draw(st.integers(0, 99)),
                steps=steps)
