"""Where the flat buffers start in memory: the streams one loop reads and writes must not share L1 sets.

The update reads params, grads and every state buffer element for element and writes params and state back. When
those buffers start at the same offset within a 4 KiB page, element i of every stream maps to the same L1 cache
set, and the loop stalls on the conflicts: measured on the 2-core CPU (torch 2.13.0, 1 thread), torch's own
``_fused_adamw_`` over four flat buffers of 37.7 M floats took 22.6-23.7 ms with the buffers' starts 0, 4 KiB or 8 KiB
apart modulo 4 KiB-pages, and 19.5 ms with them 64 B to 1 KiB apart. Large allocations come from ``mmap``, so the
allocator hands every buffer of 32 MiB and up the same offset in its page: the placement must be made, not left to
chance. These buffers are above that size, so on a build that leaves it to chance every start coincides.
"""

import itertools

import torch

from compiled_step import FusedStep

# L1 set index bits span 4 KiB (64 sets of 64 B lines on the x86 cores we run on); streams a few lines apart
# fall in different sets.
PAGE_BYTES, STAGGER_BYTES = 4096, 256
NUMEL = 9 << 20  # 36 MiB of fp32 per buffer: above glibc's largest mmap threshold (32 MiB), so mmap'd


def _offsets(buffers):
    return {name: b.data_ptr() % PAGE_BYTES for name, b in buffers.items()}


def _apart(a: int, b: int) -> int:
    d = abs(a - b) % PAGE_BYTES
    return min(d, PAGE_BYTES - d)


def test_an_updates_streams_start_in_different_cache_sets():
    params = [torch.nn.Parameter(torch.zeros(NUMEL)), torch.nn.Parameter(torch.zeros(7))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False)
    fused.step()
    (group,) = fused.engine.storage.groups
    buffers = {"params": group.params, "grads": group.grads, **group.state}
    assert set(buffers) == {"params", "grads", "exp_avg", "exp_avg_sq"}
    offsets = _offsets(buffers)
    for (a, x), (b, y) in itertools.combinations(offsets.items(), 2):
        assert _apart(x, y) >= STAGGER_BYTES, (a, b, offsets)
    # the placement costs no alignment: every buffer starts on a 64-byte line
    assert all(x % 64 == 0 for x in offsets.values()), offsets


def test_the_placement_keeps_each_buffer_inside_its_storage():
    params = [torch.nn.Parameter(torch.randn(NUMEL // 4)) for _ in range(2)]
    ref = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    fused = FusedStep(opt, compile=False)
    fused.step()
    (group,) = fused.engine.storage.groups
    for b in (group.params, group.grads, *group.state.values()):
        storage = b.untyped_storage()
        end = b.storage_offset() * b.element_size() + b.numel() * b.element_size()
        assert b.storage_offset() >= 2 and end <= storage.nbytes()
    for p, r in zip(params, ref):  # SGD's first step: p - lr * g (momentum buffer = g)
        torch.testing.assert_close(p.detach(), r - 0.5, rtol=0, atol=0)
