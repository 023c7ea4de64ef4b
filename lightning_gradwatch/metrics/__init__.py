"""torchmetrics aggregators (state reduced across ranks with ``dist_reduce_fx``)."""

from .alignment import AlignmentMoments

__all__ = ["AlignmentMoments"]
