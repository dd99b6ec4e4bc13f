"""Tests for compiled_step.padding.

Every comparison here is exact (integer counts): the reference is a brute-force Python
loop over each row's tail, written independently of the cumprod implementation.
"""

from __future__ import annotations

import pytest
import torch

from compiled_step.padding import count_tail_padding, count_tail_padding_tensor


def _brute_force_tail_padding(labels: torch.Tensor, ignore_label: int) -> int:
    total = 0
    for row in labels.tolist():
        for value in reversed(row):
            if value != ignore_label:
                break
            total += 1
    return total


def test_seed_docstring_example_gives_five():
    labels = torch.tensor(
        [
            [-100, 1, 1, -100, -100],  # 2 tail -100s
            [-100, -100, 2, 3, 4],  # 0 tail -100s
            [5, 6, -100, -100, -100],  # 3 tail -100s
        ]
    )
    result = count_tail_padding(labels)
    assert result == 5
    # NeMo Automodel returns a Python int, not a tensor or a float.
    assert type(result) is int
    # There are 8 ignore labels in total; only the tail ones count.
    assert int((labels == -100).sum()) == 8


@pytest.mark.parametrize("ignore_label", [-100, 0, 7])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_matches_brute_force_on_random_inputs(ignore_label, dtype):
    gen = torch.Generator().manual_seed(1234 + ignore_label)
    for trial in range(40):
        batch = int(torch.randint(1, 6, (), generator=gen))
        seq = int(torch.randint(1, 12, (), generator=gen))
        labels = torch.randint(0, 5, (batch, seq), generator=gen, dtype=torch.int64)
        # Sprinkle ignore labels everywhere, then force some rows into the edge cases.
        labels[torch.rand(batch, seq, generator=gen) < 0.4] = ignore_label
        labels[0, :] = ignore_label  # an all-padding row
        if batch > 1:
            labels[1, :] = 3 if ignore_label != 3 else 4  # a row without any padding
        if batch > 2:
            labels[2, -1] = 1 if ignore_label != 1 else 2  # padding only in the middle
        labels = labels.to(dtype)
        expected = _brute_force_tail_padding(labels, ignore_label)
        assert count_tail_padding(labels, ignore_label) == expected, (trial, labels)
        as_tensor = count_tail_padding_tensor(labels, ignore_label)
        assert as_tensor.dim() == 0 and as_tensor.dtype == torch.int64
        assert int(as_tensor) == expected, (trial, labels)


def test_tensor_variant_on_doc_example_and_edges():
    all_pad = torch.full((2, 4), -100)
    assert int(count_tail_padding_tensor(all_pad)) == 8
    no_pad = torch.arange(8).reshape(2, 4)
    assert int(count_tail_padding_tensor(no_pad)) == 0
    empty_seq = torch.empty((3, 0), dtype=torch.int64)
    assert int(count_tail_padding_tensor(empty_seq)) == 0
    empty_batch = torch.empty((0, 5), dtype=torch.int64)
    assert count_tail_padding(empty_batch) == 0


def test_tensor_variant_does_not_sync_to_host(monkeypatch):
    # A host sync would go through Tensor.item / __bool__ / tolist; make them all fail.
    labels = torch.tensor([[1, -100], [-100, -100]])

    def _forbidden(*args, **kwargs):
        raise AssertionError("count_tail_padding_tensor read a value back to the host")

    for name in ("item", "__bool__", "tolist", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _forbidden)
    result = count_tail_padding_tensor(labels)
    monkeypatch.undo()
    assert int(result) == 3


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([1, -100, -100]), torch.full((2, 3, 4), -100), torch.tensor(5)],
    ids=["1d", "3d", "0d"],
)
def test_not_2d_raises_value_error(labels):
    with pytest.raises(ValueError, match="2-D"):
        count_tail_padding(labels)
    with pytest.raises(ValueError, match="2-D"):
        count_tail_padding_tensor(labels)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        count_tail_padding([[1, -100]])
    with pytest.raises(TypeError, match="integer dtype"):
        count_tail_padding_tensor(torch.tensor([[1.0, -100.0]]))
    with pytest.raises(TypeError, match="ignore_label"):
        count_tail_padding(torch.tensor([[1, -100]]), ignore_label=-100.0)
    with pytest.raises(TypeError, match="ignore_label"):
        count_tail_padding(torch.tensor([[1, -100]]), ignore_label=True)
