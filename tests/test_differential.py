"""Differential tests: FusedStep beside eager ``torch.optim`` + ``clip_grad_norm_`` on drawn configurations.

Hypothesis draws a ``Case`` (tests/differential_strategies.py): optimizer (AdamW, Adam, SGD) and hyperparameters
per param group (tensor lr too), an LR scheduler, the param dtype (fp64, fp32, bf16, fp16), shapes (0-d, empty,
transposed), clip on or off, the norm type, grad scale, non-finite grads, params without a grad, how grads are
zeroed, and lifecycle events at random steps (add_param_group, optimizer.load_state_dict, a .data swap, an alias
of a param, a second FusedStep, switching to optimizer.step() and back). ``differential.run_case`` runs it on
two copies of the params and compares params, optimizer state and the returned norm after every step, at the
tolerance of the dtype (``differential.TOLERANCES`` says why each is what it is).

Budget: CI runs a fixed number of examples from a fixed seed (printed in the test's output and in a failing
example's notes); more with environment variables:

    COMPILED_STEP_DIFF_EXAMPLES=2000 COMPILED_STEP_DIFF_SEED=7 python -m pytest -q tests/test_differential.py

Compile cost: the drawn examples run with ``compile=False``, which runs FusedStep's same functions eagerly (the
README's "second reference"): every orchestration path (plans, binding, hooks, state adoption, the skip) is
FusedStep's own, and an example costs milliseconds instead of a cold compile per new graph (flags such as
amsgrad, maximize, nesterov, the norm type and the dtype each specialise the graphs). One compiled test runs a
few examples of one configuration family with ``compile=True``, so the compiled graphs are checked against eager
torch too, at a bounded number of graphs.

A failure prints the shrunk ``Case`` as runnable Python (``from differential import *; run_case(Case(...))``,
run from tests/) and the seed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, given, note, seed, settings

from differential import run_case
from differential_strategies import EVENTS, cases

EXAMPLES = int(os.environ.get("COMPILED_STEP_DIFF_EXAMPLES", "0"))  # 0: the CI budget of each test
SEED = int(os.environ.get("COMPILED_STEP_DIFF_SEED", "20260"))
print(f"test_differential: hypothesis seed {SEED} (COMPILED_STEP_DIFF_SEED), examples per test: "
      f"{EXAMPLES or 'CI budget'} (COMPILED_STEP_DIFF_EXAMPLES)")


def budget(ci_examples):
    """Hypothesis settings: the CI budget (or COMPILED_STEP_DIFF_EXAMPLES), no deadline (a cold compile takes
    seconds), no example database (CI reruns the same seed; a failure prints its own repro)."""
    return settings(max_examples=EXAMPLES or ci_examples, deadline=None, database=None, print_blob=False,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink, Phase.explain),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(case):
    note(f"seed {SEED}; repro (run from tests/):\n{case.repro()}")
    run_case(case)


@seed(SEED)
@budget(150)
@given(cases())
def test_fused_step_matches_eager_torch(case):
    """Everything drawn together: every dtype, optimizer, event and option."""
    check(case)


@seed(SEED)
@budget(60)
@given(cases(dtypes=("float64",)))
def test_float64_matches_eager_torch_to_its_precision(case):
    """fp64 alone, where the tolerance is 1e-12 relative: a step computed anywhere in fp32 shows (~1e-7)."""
    check(case)


@seed(SEED)
@budget(80)
@given(cases(dtypes=("float32", "bfloat16"), events=EVENTS + EVENTS))
def test_lifecycle_events_keep_fused_step_on_eager_torch(case):
    """More events per run (the list repeats each): aliases, rebuilds, second FusedSteps, zero_grad styles."""
    check(case)


@seed(SEED)
@budget(3)
@given(cases(dtypes=("float32",), optimizers=("AdamW",), schedulers=(None, "LambdaLR"), layouts=("flat",),
             compile=True))
def test_compiled_fused_step_matches_eager_torch(case):
    """compile=True on one family (fp32 AdamW, flat params): hyperparameter values enter the graphs as tensors,
    so examples share graphs except where a flag (amsgrad, maximize, the norm type) specialises them."""
    check(case)
