"""Aliases of the flat buffers are made on their own device, whatever the current device is.

torch >= 2.9's ``Tensor.__dlpack__`` refuses a CUDA tensor whose device is not the current device, and
``storage.own_storage_alias`` (every aliased param's ``p.data``, made at the first step) goes through
DLPack. Params moved with ``model.to("cuda:1")`` and no ``torch.cuda.set_device`` failed at the first
step. Without a GPU this is checked with stand-ins: a view that reports a CUDA device (a CPU tensor's
memory and geometry), ``torch.cuda.device`` replaced by a recorder of the current index, and
``torch.from_dlpack`` replaced by one that performs torch's check (the refusal, written out from
torch/_tensor.py ``__dlpack__``) before taking the real CPU tensor's alias. The real two-GPU run is in
tests/test_cuda.py (``test_params_on_a_device_other_than_the_current_one_step``).
"""

from __future__ import annotations

import pytest
import torch

from compiled_step import storage


class _CurrentCudaDevice:
    """Stands in for ``torch.cuda.device``: makes ``index`` the current device while entered."""

    current = 0
    entered: list[int] = []

    def __init__(self, device) -> None:
        self.index = torch.device(device).index if not isinstance(device, int) else device

    def __enter__(self):
        self.before, type(self).current = type(self).current, self.index
        type(self).entered.append(self.index)
        return self

    def __exit__(self, *exc) -> bool:
        type(self).current = self.before
        return False


class _ViewOnCuda:
    """A view that reports ``cuda:<index>``; everything else is the wrapped CPU tensor's."""

    def __init__(self, t: torch.Tensor, index: int) -> None:
        self.t = t
        self.device = torch.device("cuda", index)

    def __getattr__(self, name):
        return getattr(self.t, name)


@pytest.fixture
def fake_cuda(monkeypatch):
    real_from_dlpack = torch.from_dlpack

    def from_dlpack_checking_the_current_device(view):
        if isinstance(view, _ViewOnCuda):
            if view.device.index != _CurrentCudaDevice.current:  # torch >= 2.9's __dlpack__ check
                raise BufferError("Can't export tensors on a different CUDA device index. "
                                  f"Expected: {view.device.index}. Current device: {_CurrentCudaDevice.current}.")
            return real_from_dlpack(view.t)
        return real_from_dlpack(view)

    monkeypatch.setattr(torch.cuda, "device", _CurrentCudaDevice)
    monkeypatch.setattr(torch, "from_dlpack", from_dlpack_checking_the_current_device)
    _CurrentCudaDevice.entered = []
    yield _CurrentCudaDevice


@pytest.mark.parametrize("current, index", [(0, 1), (1, 0), (0, 0)])
def test_own_storage_alias_is_made_on_the_views_device(fake_cuda, current, index):
    fake_cuda.current = current
    buffer = torch.arange(2 * storage.ROW, dtype=torch.float32)[storage.ROW:].view(4, -1)
    view = buffer[1:3]
    alias = storage.own_storage_alias(_ViewOnCuda(view, index))
    assert fake_cuda.current == current  # the caller's current device is restored
    assert fake_cuda.entered == [index]
    assert alias.data_ptr() == view.data_ptr() and torch.equal(alias, view)


def test_cpu_views_enter_no_device_guard(fake_cuda):
    view = torch.arange(2 * storage.ROW, dtype=torch.float32)[storage.ROW:]
    alias = storage.own_storage_alias(view)
    assert fake_cuda.entered == [] and alias.data_ptr() == view.data_ptr()
