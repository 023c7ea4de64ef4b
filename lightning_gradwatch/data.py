"""Dataset indices for per-sample attribution.

:class:`GradientWeightAlignment` keeps per-sample scores when it can tell which dataset
sample each row of a training batch is. The convention:

- dict batches: the indices are under the key ``"index"`` (``indices="index"``, the
  default); any other key can be named;
- tuple/list batches: name the position, e.g. ``indices=-1`` for the last element;
- anything else: pass a callable ``batch -> (B,) integer tensor``.

:class:`IndexedDataset` adds the index to each item so that the default collate function
produces such batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

#: How to find indices in a batch: a dict key, a tuple position, a callable, or None.
IndexSpec = str | int | Callable[[Any], Tensor] | None

INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that every item carries its index.

    - A dict item gets an extra key ``"index"``.
    - A tuple/list item gets the index appended as its last element: ``(x, y) -> (x, y, i)``.
      Unpack it in ``training_step`` (``x, y, _ = batch``) and pass ``indices=-1`` to the
      callback.
    - Any other item ``v`` becomes ``{"input": v, "index": i}``.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_gradwatch.data import IndexedDataset
        >>> ds = IndexedDataset(TensorDataset(torch.randn(4, 2), torch.arange(4)))
        >>> ds[2][2]
        2
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return {**item, INDEX_KEY: index}
        if isinstance(item, tuple | list):
            return (*item, index)
        return {"input": item, INDEX_KEY: index}


def batch_indices(batch: Any, spec: IndexSpec, batch_size: int) -> Tensor | None:
    """The ``(B,)`` int64 dataset indices of a batch, or None when ``spec`` finds none.

    Raises:
        ValueError: the indices found do not have one entry per sample.
    """
    if spec is None:
        return None
    if callable(spec):
        found = spec(batch)
    elif isinstance(spec, str):
        found = batch.get(spec) if isinstance(batch, Mapping) else None
    elif isinstance(spec, int) and isinstance(batch, Sequence) and not isinstance(batch, str):
        found = batch[spec] if -len(batch) <= spec < len(batch) else None
    else:
        found = None
    if found is None:
        return None
    found = torch.as_tensor(found).reshape(-1)
    integer = not (found.is_floating_point() or found.is_complex() or found.dtype == torch.bool)
    if found.numel() != batch_size or not integer:
        raise ValueError(
            f"dataset indices must be {batch_size} integers, one per sample, got a tensor of "
            f"shape {tuple(found.shape)} and dtype {found.dtype} with indices={spec!r}; "
            f"{HOW_TO_INDEX}"
        )
    return found.to(torch.int64)


HOW_TO_INDEX = (
    "wrap the training dataset in lightning_gradwatch.IndexedDataset and pass indices=-1 "
    "(tuple items) or indices='index' (dict items), a callable batch -> (B,) indices, or "
    "indices=None to turn per-sample attribution off"
)


def index_checks(indices: Tensor) -> Tensor:
    """The ``(3,)`` int64 summary ``[lowest, highest, repeated]`` of a batch's ``(B,)`` int64
    dataset indices (``B >= 1``), computed on their device without a host synchronisation, so
    that the checks of many batches can be read back together (:func:`raise_for_index_checks`).
    """
    ordered = indices.sort().values
    repeated = (ordered[1:] == ordered[:-1]).any().to(torch.int64)
    return torch.stack([ordered[0], ordered[-1], repeated])


def raise_for_index_checks(
    checks: tuple[int, int, int], spec: IndexSpec, dataset_length: int | None
) -> int:
    """Refuse one batch's indices from their :func:`index_checks` values (read back to the host);
    returns the largest index plus one.

    Raises:
        ValueError: a negative index, an index repeated within the batch (labels taken as
            indices: a sampler never repeats a sample within one batch), or an index beyond
            ``dataset_length``. The message says which ``indices=`` to pass.
    """
    low, high, has_repeat = checks
    if low < 0:
        raise ValueError(
            f"dataset index {low} < 0 found with indices={spec!r}: dataset indices must be "
            f"non-negative; {HOW_TO_INDEX}"
        )
    if has_repeat:
        raise ValueError(
            f"the dataset indices found with indices={spec!r} repeat within one training batch "
            f"(e.g. labels or class ids taken as indices); a sampler never repeats a sample "
            f"within a batch. Point `indices` at the dataset index instead: {HOW_TO_INDEX}"
        )
    if dataset_length is not None and high >= dataset_length:
        raise ValueError(
            f"dataset index {high} found with indices={spec!r}, but the training dataset has "
            f"{dataset_length} samples; {HOW_TO_INDEX}"
        )
    return high + 1


def check_indices(indices: Tensor, spec: IndexSpec, dataset_length: int | None) -> int:
    """Validate a batch's ``(B,)`` int64 dataset indices now; returns the largest index plus one.

    One host synchronisation (the three checks are read back together). Raises as
    :func:`raise_for_index_checks`.
    """
    if indices.numel() == 0:
        return 0
    low, high, repeated = index_checks(indices).tolist()
    return raise_for_index_checks((low, high, repeated), spec, dataset_length)
