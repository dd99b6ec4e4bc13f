"""Shared test setup.

torch.compile is slow on a 2-core CPU (5-30 s per cold graph), so tests share compiled graphs:
they use the same bucket size (``BUCKET``), the same dtypes and the same update variants, and
FusedStep caches its compiled wrappers per process. Inductor's on-disk cache makes later runs warm.
"""

import pytest
import torch

# Small buckets compile faster (compile time is linear in the bucket length); the layouts below
# have more tensors than this so that several buckets and a padded tail bucket are exercised.
BUCKET = 4
# Tensors of at most this many elements take the packed path (one flat buffer, state in arenas), the
# rest the bucket path, so every test below exercises both with one layout.
PACK = 20

# Shapes of a small model: matrices, a 0-d scalar, a one-element bias, a transposed
# (non-contiguous but dense) weight, and tensors of equal size (duck-shaping would specialise them).
SHAPES = [(8, 6), (6,), (), (1,), (6, 8), (5, 5), (5, 5), (13,), (3, 4, 2)]


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES, transposed_index=4):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        if i == transposed_index and len(shape) == 2:
            t = torch.randn(shape[::-1], generator=gen).t()  # dense, non-contiguous
        params.append(torch.nn.Parameter(t.to(dtype)))
    return params


def make_grads(params, step, scale=3.0, seed=1000):
    """Deterministic random grads for ``step``; large enough that clipping at 1.0 is active."""
    gen = torch.Generator().manual_seed(seed + step)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.empty_like(p).copy_(g)  # same strides as the param, like autograd


def write_grads(params, grads):
    """Grads written into ``p.grad`` in place where it exists (FusedStep's persistent grad buffers, and no
    host-to-device copy when ``grads`` are on the params' device), a clone of each where it is None."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# The step-memory tests measure peak resident memory in fresh subprocesses, several per case (about 4 minutes
# in all): they run on CI's first leg only (torch 2.13.0, the fully tested version), so the four legs of the
# README's test command fit CI's 90 minutes. What they check, the order in which FusedStep allocates and frees
# its buffers, is this package's code, the same on every torch.
PRIMARY_TORCH = "2.13.0"
primary_leg_only = pytest.mark.skipif(
    torch.__version__.split("+")[0] != PRIMARY_TORCH,
    reason=f"step-memory measurement: runs on the torch {PRIMARY_TORCH} leg only (CI time; see conftest.py)")
