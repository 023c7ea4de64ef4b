"""torchmetrics aggregators for statistics gathered across steps and ranks (state reduced
across processes with ``dist_reduce_fx``)."""

from .alignment import AlignmentMoments
from .noise import GradientNoiseSums, NoiseSums, RatioEMA, all_reduce_sum

__all__ = ["AlignmentMoments", "GradientNoiseSums", "NoiseSums", "RatioEMA", "all_reduce_sum"]
