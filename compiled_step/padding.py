"""Counting tail padding in label tensors.

``count_tail_padding`` has NeMo Automodel's name, signature and result (a Python ``int``); it
syncs with the host because it returns an ``int``. ``count_tail_padding_tensor`` is the
same count as a 0-d tensor on the labels' device, with no host sync and no
data-dependent Python branch, so it can run inside a compiled region or be accumulated
with :meth:`compiled_step.lifecycle.GradAccumulation.add_tokens` without stalling.

"Tail padding" of a row is the run of ``ignore_label`` entries at its end (right
padding). Ignore labels elsewhere in the row (a masked prompt, a hole in the middle) are
not counted.
"""

from __future__ import annotations

import torch

__all__ = ["count_tail_padding", "count_tail_padding_tensor"]


def _check_labels(labels: object, ignore_label: object) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (batch, seq_len), got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(
            f"labels must be 2-D (batch, seq_len); got a {labels.dim()}-D tensor of shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    # bool is an int subclass; True as an ignore label is a bug, not a label id.
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int):
        raise TypeError(f"ignore_label must be an int, got {type(ignore_label).__name__}")


def count_tail_padding_tensor(labels: torch.Tensor, ignore_label: int = -100) -> torch.Tensor:
    """Count tail ``ignore_label`` entries of a ``(batch, seq_len)`` label tensor, as a tensor.

    Returns a 0-d ``torch.int64`` tensor on ``labels.device``. Nothing here reads a value
    back to the host, so the call does not synchronise with an accelerator.

    Raises ``TypeError`` for a non-tensor, a non-integer dtype or a non-int
    ``ignore_label``, and ``ValueError`` when ``labels`` is not 2-D.
    """
    _check_labels(labels, ignore_label)
    # Read each row from its end: the running product of "is padding" stays 1 exactly
    # while we are still inside the tail run and drops to 0 at the first real label.
    tail_run = torch.cumprod(labels.flip(dims=[1]).eq(ignore_label).to(torch.int64), dim=1)
    return tail_run.sum()


@torch.no_grad()
def count_tail_padding(labels: torch.Tensor, ignore_label: int = -100) -> int:
    """Count the padding tokens at the tail of each row of ``labels`` (NeMo Automodel's function).

    Example::

        labels = torch.tensor([
            [-100, 1, 1, -100, -100],   # 2 tail -100s
            [-100, -100, 2, 3, 4],      # 0 tail -100s
            [5, 6, -100, -100, -100],   # 3 tail -100s
        ])
        count_tail_padding(labels)  # 5, although 8 entries are -100

    Args:
        labels: integer tensor of shape ``(batch, seq_len)``.
        ignore_label: the label id used for padding. Defaults to -100.

    Returns:
        int: the total number of tail padding tokens. This reads the count back to the
        host; use :func:`count_tail_padding_tensor` to keep it on the device.
    """
    return int(count_tail_padding_tensor(labels, ignore_label).item())
