"""Per-sample attribution with the index checks read back later: same results as checking
every batch at once, and the same refusals."""

from __future__ import annotations

import pytest
import torch

from lightning_gradwatch.callbacks import _gwa_samples
from lightning_gradwatch.callbacks._gwa_samples import SampleScores


def _batch(indices: list[int], scores: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(indices), torch.tensor(scores, dtype=torch.float64)


def test_pending_batches_apply_in_order() -> None:
    """A sample seen twice (a sampler with replacement) keeps its last score as ``latest``
    and both in the epoch mean, as when each batch is applied at once."""
    samples = SampleScores("index", keep_history=True)
    samples.record(*_batch([0, 2], [0.1, 0.2]))
    samples.record(*_batch([2, 5], [0.4, -0.3]))
    assert samples.latest is None  # nothing read back yet
    epoch_mean = samples.finish_epoch(epoch=0)
    assert epoch_mean is not None and epoch_mean.numel() == 6
    assert epoch_mean[[0, 2, 5]].tolist() == pytest.approx([0.1, 0.3, -0.3])
    assert torch.isnan(epoch_mean[[1, 3, 4]]).all()
    table = samples.sample_scores()
    assert table["index"].tolist() == [0, 2, 5]
    assert table["score"].tolist() == pytest.approx([0.1, 0.4, -0.3])


@pytest.mark.parametrize(
    ("indices", "match"),
    [([3, 3], "repeat within one training batch"), ([-1, 0], "< 0"), ([1, 9], "has 8 samples")],
)
def test_a_bad_batch_is_refused_at_the_read_back(indices: list[int], match: str) -> None:
    samples = SampleScores("index", keep_history=True)
    samples.dataset_length = 8
    samples.record(*_batch([0, 1], [0.1, 0.2]))
    samples.record(*_batch(indices, [0.5, 0.5]))
    with pytest.raises(ValueError, match=match):
        samples.flush()
    assert samples.latest is None  # nothing of the pending batches was applied


def test_pending_batches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gwa_samples, "MAX_PENDING", 3)
    samples = SampleScores("index", keep_history=False)
    for start in range(0, 6, 2):
        samples.record(*_batch([start, start + 1], [0.0, 0.0]))
    assert samples.latest is not None and samples.num_indices == 6  # applied at the third
