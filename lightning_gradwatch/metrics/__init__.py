"""torchmetrics aggregators for statistics gathered across steps and ranks."""

from .noise import GradientNoiseSums, NoiseSums, RatioEMA, all_reduce_sum

__all__ = ["GradientNoiseSums", "NoiseSums", "RatioEMA", "all_reduce_sum"]
