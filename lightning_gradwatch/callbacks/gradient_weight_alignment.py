"""Gradient-weight alignment (Hoelzl, Rueckert, Kaissis, NeurIPS 2025) as a Lightning callback."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import IterableDataset, Subset
from typing_extensions import override

from .._lightning import overrides
from ..data import HOW_TO_INDEX, INDEX_KEY, IndexSpec, batch_indices, check_indices
from ..functional.stopping import select_epoch
from ..loggers import add_custom_scalars, is_logging_step, log_histogram_raw, warn_if_no_logger
from ..metrics.alignment import AlignmentMoments
from ..probe import ProbeStats
from ..probe.rules.parametrized import reparametrized_tensors
from ._probe_callback import ProbeCallback
from ._stopping_default import DEFAULT_OPTIONS, DEFAULT_RULE

HEAD = "head"
ALL = "all"


class GradientWeightAlignment(ProbeCallback):
    """Per-sample gradient-weight alignment scores and the paper's per-epoch aggregate.

    For every training sample ``i`` of every training batch (every micro-batch under gradient
    accumulation), before the optimizer step, the score is ``gamma_i = cos(-g_i, w)``: the
    cosine between sample ``i``'s descent direction and the selected weights ``w`` (weights
    only, never biases). At the end of each training epoch, over all samples of the epoch and
    all ranks, the aggregate is ``GWA = mean(gamma) / (excess_kurtosis(gamma) + 1.2)`` with the
    biased (Fisher) kurtosis.

    Logged through ``pl_module.log`` (monitorable by ``EarlyStopping``/``ModelCheckpoint``):

    - ``gwa/epoch``: the aggregate, each epoch; ``gwa/mean`` and ``gwa/kurtosis``: its parts.
    - ``gwa/step``: the mean score of the training batch, on Lightning's
      ``log_every_n_steps`` schedule (this rank's batch; not synchronised).
    - ``gwa/layer/<param name>``: in multi-layer mode, the aggregate of each layer's own
      scores (``w`` = that layer's weight), each epoch.

    With a TensorBoard logger it also writes the histogram ``gwa/scores`` of the epoch's
    scores (all ranks) and a custom-scalars layout grouping the curves.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping
        >>> gwa = GradientWeightAlignment()  # the final linear layer's weight, as in the paper
        >>> trainer = pl.Trainer(callbacks=[gwa, GWAEarlyStopping(patience=5)])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> gwa.history[-1]["gwa"], gwa.most_misaligned(10)  # doctest: +SKIP

    Args:
        params: ``"head"`` (default): the weight of the last ``nn.Linear`` whose output is the
            model's output, found during the first training forward pass. ``"all"``: every
            trainable non-bias parameter (scores over their concatenation, plus one score per
            layer). A name or a list of names from ``named_parameters()``: those (a list of
            two or more also gets per-layer scores). A reparametrized weight (``spectral_norm``,
            ``weight_norm``, any ``torch.nn.utils.parametrize`` parametrization) is scored as
            the effective weight the layer uses, named ``"<module>.weight"``: the head in head
            mode, in place of its sources in ``"all"`` mode, and when named.
        indices: where to find each sample's dataset index in a batch, for per-sample
            attribution: a dict key (default ``"index"``, as :class:`IndexedDataset` adds to
            dict items), a tuple position (``-1`` for :class:`IndexedDataset` with tuple items),
            a callable ``batch -> (B,) ints``, or ``None`` for no attribution.
        keep_history: keep each sample's per-epoch mean score (``score_history()``); costs
            one float per sample per epoch.
        write_scores: each epoch, write ``gwa_scores/epoch_XXXX.csv`` (index, epoch-mean
            score) into the logger's directory (rank zero).
        histogram_bins: bins over ``[-1, 1]`` of the TensorBoard histogram.
        loss_reduction: ``"mean"`` or ``"sum"``: how ``training_step`` reduces the per-sample
            losses.
        backward: with several backward passes per training batch (manual optimisation, e.g.
            a GAN), the 0-based index of the one to score; ``None`` (default): the only one
            that reaches the scored weights (a second one raises ``RuntimeError``).

    Raises:
        ValueError: at ``setup``, for unknown parameter names or a model without any
            ``nn.Linear`` in head mode.
        RuntimeError: at the first training batch, when no ``nn.Linear`` output is the model
            output in head mode (name the weight with ``params="<module>.weight"``).
    """

    def __init__(
        self,
        params: str | Sequence[str] = HEAD,
        indices: IndexSpec = INDEX_KEY,
        keep_history: bool = True,
        write_scores: bool = False,
        histogram_bins: int = 100,
        loss_reduction: str = "mean",
        backward: int | None = None,
    ) -> None:
        super().__init__(loss_reduction=loss_reduction, backward=backward)  # type: ignore[arg-type]
        if isinstance(params, str):
            self._mode = params if params in (HEAD, ALL) else "names"
            self._names: list[str] = [] if params in (HEAD, ALL) else [params]
        else:
            self._mode = "names"
            self._names = list(dict.fromkeys(params))
            if not self._names:
                raise ValueError("params is an empty list; pass 'head', 'all' or weight names")
        self.indices = indices
        self.keep_history = keep_history
        self.write_scores = write_scores
        self.histogram_bins = histogram_bins

        self.head_name: str | None = None
        #: one dict per finished epoch: ``epoch``, ``gwa``, ``mean``, ``kurtosis``, ``count``.
        self.history: list[dict[str, float]] = []
        #: per-layer aggregate per finished epoch (multi-layer mode): ``{name: [gwa, ...]}``.
        self.layer_history: dict[str, list[float]] = {}

        self._epoch_metric = AlignmentMoments(histogram_bins=histogram_bins)
        self._layer_metrics: dict[str, AlignmentMoments] = {}
        self._candidates: list[str] = []
        self._detector: _HeadDetector | None = None
        self._epoch_finalized = False
        self._warned_no_indices = False
        # Per-sample attribution, grown to the largest index seen (float64; NaN = unseen).
        self._latest: Tensor | None = None
        self._epoch_sum: Tensor | None = None
        self._epoch_count: Tensor | None = None
        self._score_history: list[Tensor] = []
        self._score_history_epochs: list[int] = []  # the epoch of each _score_history row
        # The GWAEarlyStopping following this callback (it registers itself at setup).
        self._selector: Any = None
        self._warned_excluded = False
        self._scored_any_batch = False  # plain bool: set on the first batch with scores
        self._checked_first_batch = False
        self._num_indices = 0  # largest dataset index seen + 1 (all ranks, after an epoch)
        self._dataset_length: int | None = None  # of the training dataset, when it has one
        self._warned_label_like = False
        # Epoch of the unfinished sums restored from a checkpoint (None: none restored).
        self._restored_epoch: int | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def score_names(self) -> list[str]:
        """The weights whose concatenation is scored (known after the first batch in head
        mode)."""
        if self._mode == HEAD:
            return [self.head_name] if self.head_name is not None else []
        return list(self._names)

    @property
    def multi_layer(self) -> bool:
        return self._mode == ALL or len(self._names) > 1

    @property
    @override
    def state_key(self) -> str:
        # Two instances scoring different weights keep separate checkpoint entries.
        params: str | list[str] = self._mode if self._mode in (HEAD, ALL) else self._names
        indices = self.indices
        if callable(indices):  # a function's repr holds its address, which changes per run
            indices = getattr(indices, "__qualname__", type(indices).__qualname__)
        return self._generate_state_key(params=params, indices=indices, backward=self.backward)

    @override
    def probe_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        named = dict(pl_module.named_parameters())
        if self._mode == HEAD:
            if self.head_name is not None:
                return [self.head_name]
            # A reparametrized head (spectral_norm, weight_norm, ...) is scored on its
            # effective weight, the one the layer multiplies by. Its trainability is read
            # from its sources: reading the weight itself would run a spectral-norm
            # power-iteration step.
            reparametrized = reparametrized_tensors(pl_module)
            self._candidates = [
                weight_name
                for name, module in pl_module.named_modules()
                if isinstance(module, nn.Linear)
                for weight_name in [f"{name}.weight" if name else "weight"]
                if (
                    bool(reparametrized[weight_name][1])
                    if weight_name in reparametrized
                    else module.weight.requires_grad
                )
            ]
            if not self._candidates:
                raise ValueError(
                    "GradientWeightAlignment(params='head') found no trainable nn.Linear in the "
                    "model, so it has no classifier head to score. Name the weight to score, "
                    f"e.g. params='<module>.weight', from {list(named)[:8]}"
                )
            return self._candidates
        if self._mode == ALL:
            self._names = [n for n, p in named.items() if p.requires_grad and not _is_bias(n)]
            self._names = _effective_in_place_of_sources(
                self._names, reparametrized_tensors(pl_module)
            )
            if not self._names:
                raise ValueError("GradientWeightAlignment(params='all'): no trainable weights")
            return self._names
        reparametrized = reparametrized_tensors(pl_module)
        unknown = [n for n in self._names if n not in named and n not in reparametrized]
        if unknown:
            raise ValueError(
                f"GradientWeightAlignment: unknown parameter names {unknown}; pass names as "
                f"listed by model.named_parameters(), e.g. {list(named)[:8]}"
            )
        biases = [n for n in self._names if _is_bias(n)]
        if biases:
            weights = [n for n in self._names if not _is_bias(n)]
            suggestion = weights or [name[: -len("bias")] + "weight" for name in biases]
            raise ValueError(
                f"GradientWeightAlignment(params=...) got the bias {biases}: GWA is the cosine "
                f"between a sample's gradient and the weights, and is defined on weights only. "
                f"Leave the biases out, e.g. params={suggestion}"
            )
        return self._names

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        warn_if_no_logger(trainer, "GradientWeightAlignment")
        self._own_tensor_state()
        super().setup(trainer, pl_module, stage)
        if self.multi_layer:
            for name in self._names:
                self._layer_metrics.setdefault(name, AlignmentMoments(self.histogram_bins))
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is self:
                break
            monitor = getattr(callback, "monitor", None)
            if (
                isinstance(callback, EarlyStopping)
                and isinstance(monitor, str)
                and monitor.startswith("gwa/")
                and not getattr(callback, "_finalizes_gwa", False)
            ):
                warnings.warn(
                    f"{type(callback).__name__}(monitor={monitor!r}) comes before "
                    f"GradientWeightAlignment in Trainer(callbacks=[...]), so it checks the "
                    f"epoch before the epoch's GWA is logged. Put GradientWeightAlignment first, "
                    f"or use GWAEarlyStopping.",
                    stacklevel=2,
                )
        _warn_if_checked_at_validation(trainer, pl_module)

    def _own_tensor_state(self) -> None:
        """Give this process its own copy of every accumulating tensor.

        ``ddp_spawn`` pickles the callback into each worker, and torch pickles CPU tensors as
        handles to one shared-memory block: without a copy, every rank would add its scores
        into the same storage (epoch counts and histograms multiplied by the world size).
        """
        epoch_metric = AlignmentMoments(self.histogram_bins)
        _load_metric_state(epoch_metric, _metric_state(self._epoch_metric))
        self._epoch_metric = epoch_metric
        for name, metric in list(self._layer_metrics.items()):
            copy = AlignmentMoments(self.histogram_bins)
            _load_metric_state(copy, _metric_state(metric))
            self._layer_metrics[name] = copy
        for attribute in ("_latest", "_epoch_sum", "_epoch_count"):
            value = getattr(self, attribute)
            if value is not None:
                setattr(self, attribute, value.clone())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dataset_length = _dataset_length(trainer)
        self._resume_partial_epoch(trainer, pl_module)

    def _resume_partial_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Account for the sums of an unfinished epoch restored from a checkpoint.

        A checkpoint written during an epoch (``ModelCheckpoint(every_n_train_steps=...)``)
        holds that epoch's partial sums. Resumed in the same epoch, they are continued. Written
        after the epoch's last batch, Lightning resumes at the next epoch without running the
        epoch's end: the sums are finalized here as that epoch, so they are not merged into the
        next one. Under several processes the checkpoint holds rank zero's partial sums only,
        which cannot be split back per rank: refused.
        """
        epoch = self._restored_epoch
        self._restored_epoch = None
        if epoch is None or float(self._epoch_metric.count) == 0:
            return
        if trainer.world_size > 1:
            raise RuntimeError(
                f"GradientWeightAlignment: this run resumes from a checkpoint written during "
                f"epoch {epoch} (before the epoch's end), under {trainer.world_size} processes. "
                f"The checkpoint holds only rank zero's partial sums of that epoch, so the "
                f"epoch's GWA would be wrong. Resume from a checkpoint written at an epoch's end "
                f"(ModelCheckpoint(save_on_train_epoch_end=True), the default without "
                f"every_n_train_steps), or resume this one on a single device."
            )
        if trainer.current_epoch > epoch:
            self.finalize_epoch(trainer, pl_module, restored_epoch=epoch)
            # Lightning starts the resumed epoch without on_train_epoch_start
            self._epoch_finalized = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        charts = {"aggregate": [r"gwa/epoch", r"gwa/mean", r"gwa/kurtosis"], "step": ["gwa/step"]}
        if self.multi_layer:
            charts["per-layer GWA"] = [r"gwa/layer/.*"]
        add_custom_scalars(trainer, "gradient-weight alignment", charts)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_finalized = False
        device = pl_module.device
        self._epoch_metric.to(device)
        for metric in self._layer_metrics.values():
            metric.to(device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._mode == HEAD and self.head_name is None and self._detector is None:
            self._detector = _HeadDetector(
                pl_module,
                set(self._candidates),
                redirected=trainer.strategy.model is not pl_module,
            )
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        detector = self._detector
        if detector is None:
            return
        self._detector = None
        head = detector.finish()
        if head is None:
            raise RuntimeError(
                "GradientWeightAlignment(params='head') could not find the classifier head: no "
                "nn.Linear output is returned unchanged as the model's output in the training "
                "forward pass. Name the weight to score instead, e.g. "
                f"GradientWeightAlignment(params={self._candidates[-1]!r}); candidates: "
                f"{self._candidates}"
            )
        self.head_name = head

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._checked_first_batch and self._detector is None:
            self._checked_first_batch = True
            if not self._scored_any_batch and not self._warned_excluded:
                self._warn_excluded([], self._probe_exclusions())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._detector is not None:  # the forward never reached backward (skipped step)
            self._detector.finish()
            self._detector = None
        if (
            self._mode == HEAD
            and self.head_name is not None
            and self.probe is not None
            and self.probe.param_names != [self.head_name]
        ):
            # The head is known: from now on hook only its layer.
            ProbeCallback.setup(self, trainer, pl_module, "fit")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._detector is not None:
            self._detector.finish()
            self._detector = None
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_probe_stats(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: ProbeStats,
        batch: Any,
        batch_idx: int,
    ) -> None:
        names = [n for n in self.score_names if n in stats.dot]
        if not self._warned_excluded:
            self._warn_excluded(names, stats.excluded)
        if not names or stats.batch_size == 0:
            return
        self._scored_any_batch = True
        scores = stats.alignment(names)
        self._epoch_metric.update(scores)
        if self.multi_layer:
            for name in names:
                self._layer_metrics[name].update(stats.alignment([name]))
        if is_logging_step(trainer):
            # Lightning writes on-step metrics only on its log_every_n_steps schedule; skipping
            # the call on the other steps saves its per-call cost without changing the output.
            pl_module.log(
                "gwa/step",
                scores.mean().float(),
                on_step=True,
                on_epoch=False,
                batch_size=len(scores),
            )
        indices = batch_indices(batch, self.indices, stats.batch_size)
        if indices is None:
            if self.indices is not None and not self._warned_no_indices:
                self._warned_no_indices = True
                warnings.warn(
                    f"GradientWeightAlignment: no dataset indices in the training batch "
                    f"(indices={self.indices!r}), so per-sample scores are not attributed. Wrap "
                    f"the dataset in lightning_gradwatch.IndexedDataset and pass the right "
                    f"`indices` (e.g. -1 for tuple batches), or indices=None to silence this.",
                    stacklevel=2,
                )
            return
        self._record_samples(indices.to(scores.device), scores.detach().to(torch.float64))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ epoch aggregate
    def finalize_epoch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        restored_epoch: int | None = None,
    ) -> None:
        """Compute, log and store the epoch's aggregate (once per epoch; a collective: every
        rank calls it from ``on_train_epoch_end``). ``GWAEarlyStopping`` calls it so that the
        callbacks' order does not matter.

        ``restored_epoch``: the sums restored from a checkpoint written after that epoch's last
        batch, whose end hooks Lightning does not run on resume: stored, not logged (Lightning
        skips that epoch's own epoch-end logging too)."""
        if self._epoch_finalized:
            return
        self._epoch_finalized = True
        result = self._epoch_metric.compute()
        layer_results = {name: m.compute() for name, m in self._layer_metrics.items()}
        edges, _ = self._epoch_metric.histogram()
        counts = result["histogram_counts"]  # summed over ranks
        self._finalize_samples(
            trainer,
            epoch=trainer.current_epoch if restored_epoch is None else restored_epoch,
            write=restored_epoch is None,
        )
        # Next epoch's power sums are taken around this epoch's mean (identical on all ranks):
        # that keeps float64 cancellation negligible (see metrics/alignment.py).
        for metric, res in [
            (self._epoch_metric, result),
            *((self._layer_metrics[k], r) for k, r in layer_results.items()),
        ]:
            metric.reset()
            if math.isfinite(float(res["mean"])):
                metric.set_shift(float(res["mean"]))
        if float(result["count"]) == 0:
            return
        epoch = trainer.current_epoch if restored_epoch is None else restored_epoch
        entry = {"epoch": float(epoch)}
        entry.update({k: float(result[k]) for k in ("gwa", "mean", "kurtosis", "count")})
        self.history.append(entry)
        if restored_epoch is not None:
            for name, layer in layer_results.items():
                self.layer_history.setdefault(name, []).append(float(layer["gwa"]))
            return
        for key in ("epoch", "mean", "kurtosis"):
            value = entry["gwa" if key == "epoch" else key]
            pl_module.log(f"gwa/{key}", value, on_step=False, on_epoch=True, sync_dist=True)
        for name, layer in layer_results.items():
            self.layer_history.setdefault(name, []).append(float(layer["gwa"]))
            pl_module.log(
                f"gwa/layer/{name}",
                float(layer["gwa"]),
                on_step=False,
                on_epoch=True,
                sync_dist=True,
            )
        n = result["count"]
        log_histogram_raw(
            trainer,
            "gwa/scores",
            edges,
            counts,
            total=float(result["mean"] * n),
            total_squares=float(result["sum_squares"]),
            step=trainer.global_step,
        )

    # ------------------------------------------------------------------ per-sample scores
    def _grow(self, size: int, device: torch.device) -> None:
        current = 0 if self._latest is None else self._latest.numel()
        if size <= current:
            return
        size = max(size, 2 * current)

        def grown(old: Tensor | None, fill: float) -> Tensor:
            new = torch.full((size,), fill, dtype=torch.float64, device=device)
            if old is not None:
                new[: old.numel()] = old.to(device)
            return new

        self._latest = grown(self._latest, float("nan"))
        self._epoch_sum = grown(self._epoch_sum, 0.0)
        self._epoch_count = grown(self._epoch_count, 0.0)

    def _record_samples(self, indices: Tensor, scores: Tensor) -> None:
        if indices.numel() == 0:
            return
        end = check_indices(indices, self.indices, self._dataset_length)
        self._num_indices = max(self._num_indices, end)
        self._grow(self._num_indices, scores.device)
        assert self._latest is not None and self._epoch_sum is not None
        assert self._epoch_count is not None
        self._latest[indices] = scores
        self._epoch_sum.index_add_(0, indices, scores)
        self._epoch_count.index_add_(0, indices, torch.ones_like(scores))

    def _finalize_samples(self, trainer: pl.Trainer, epoch: int, write: bool = True) -> None:
        """Merge epoch ``epoch``'s per-sample sums across ranks and append the epoch means
        (and write them when ``write_scores`` and ``write``)."""
        if self.indices is None:
            return
        world = trainer.world_size
        if world > 1 and dist.is_available() and dist.is_initialized():
            device = self._epoch_metric.count.device
            size = torch.tensor(self._num_indices, device=device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX)
            if int(size) == 0:
                return
            self._num_indices = int(size)
            self._grow(self._num_indices, device)
            assert self._latest is not None and self._epoch_sum is not None
            assert self._epoch_count is not None
            # Buffers may have grown to different capacities: exchange the common prefix.
            size = self._num_indices
            count, latest_all = self._epoch_count[:size], self._latest[:size]
            seen = (count > 0).to(torch.float64)
            latest = torch.where(seen > 0, latest_all, torch.zeros_like(latest_all))
            packed = torch.stack([self._epoch_sum[:size], count, latest, seen])
            dist.all_reduce(packed)
            self._epoch_sum, self._epoch_count = packed[0].clone(), packed[1].clone()
            # A sample seen on several ranks this epoch (DistributedSampler padding) keeps the
            # mean of their latest scores.
            merged = packed[2] / packed[3].clamp_min(1)
            self._latest = torch.where(packed[3] > 0, merged, latest_all)
        if self._latest is None or self._epoch_sum is None or self._epoch_count is None:
            return
        self._warn_if_indices_look_like_labels()
        size = self._num_indices
        epoch_mean = self._epoch_sum[:size] / self._epoch_count[:size]
        epoch_mean[self._epoch_count[:size] == 0] = float("nan")
        self._last_epoch_mean = epoch_mean.float().cpu()
        if self.keep_history:
            self._score_history.append(self._last_epoch_mean)
            self._score_history_epochs.append(epoch)
        if self.write_scores and write and trainer.is_global_zero:
            self._write_epoch_scores(trainer, self._last_epoch_mean)
        self._epoch_sum.zero_()
        self._epoch_count.zero_()

    def _warn_if_indices_look_like_labels(self) -> None:
        """Warn once when an epoch attributed many samples to few distinct indices: every
        sample is normally seen about once per epoch, so labels or class ids taken as indices
        (the same few values in every batch) show up here even when a batch holds no repeat."""
        assert self._epoch_count is not None
        scored = self._epoch_count.sum()
        distinct = (self._epoch_count > 0).sum()
        if self._warned_label_like or not bool(4 * distinct <= scored):
            return
        self._warned_label_like = True
        rank_zero_warn(
            f"GradientWeightAlignment: this epoch scored {int(scored)} samples but found only "
            f"{int(distinct)} distinct dataset indices with indices={self.indices!r}: they look "
            f"like labels, not dataset indices, and the per-sample scores are merged wrongly. "
            f"{HOW_TO_INDEX[0].upper()}{HOW_TO_INDEX[1:]}.",
        )

    def _write_epoch_scores(self, trainer: pl.Trainer, epoch_mean: Tensor) -> None:
        directory = os.path.join(trainer.log_dir or trainer.default_root_dir, "gwa_scores")
        os.makedirs(directory, exist_ok=True)
        seen = torch.nonzero(~torch.isnan(epoch_mean)).flatten()
        path = os.path.join(directory, f"epoch_{trainer.current_epoch:04d}.csv")
        with open(path, "w") as handle:
            handle.write("index,score\n")
            for index, score in zip(seen.tolist(), epoch_mean[seen].tolist(), strict=True):
                handle.write(f"{index},{score:.9g}\n")

    def sample_scores(self) -> dict[str, Tensor]:
        """Per-sample scores of every dataset index seen, as CPU tensors of equal length.

        Returns:
            ``{"index": (M,) int64, "score": (M,) latest score, "epoch_mean": (M,) mean over
            the last finished epoch (NaN if not seen in it)}``. ``pandas.DataFrame(...)``
            of it is a table. Empty tensors before any indexed batch.
        """
        if self._latest is None:
            empty = torch.zeros(0, dtype=torch.float64)
            return {"index": torch.zeros(0, dtype=torch.int64), "score": empty, "epoch_mean": empty}
        latest = self._latest[: self._num_indices].cpu()
        index = torch.nonzero(~torch.isnan(latest)).flatten()
        last = getattr(self, "_last_epoch_mean", None)
        epoch_mean = torch.full((index.numel(),), float("nan"), dtype=torch.float64)
        if last is not None:
            inside = index < last.numel()
            epoch_mean[inside] = last[index[inside]].double()
        return {"index": index, "score": latest[index], "epoch_mean": epoch_mean}

    def score_history(self) -> Tensor:
        """``(epochs, N)`` float32 per-sample mean score of each finished epoch (NaN where a
        sample was not seen), ``N`` the largest index seen plus one."""
        if not self._score_history:
            return torch.zeros(0, 0)
        width = max(h.numel() for h in self._score_history)
        rows = [
            torch.cat([h, torch.full((width - h.numel(),), float("nan"))])
            for h in self._score_history
        ]
        return torch.stack(rows)

    def best_epoch(self, rule: str | None = None, **options: Any) -> int | None:
        """Post-hoc selection over the finished epochs: the epoch number ``rule`` selects from
        :attr:`history` (``None`` when it selects none), with the rules and options of
        :mod:`lightning_gradwatch.functional.stopping`. ``"argmax"`` is the paper's rule for
        training from scratch, ``"max_after_first_min"`` its rule for fine-tuning; ``None``
        (default) is ``GWAEarlyStopping``'s default rule and options."""
        if rule is None:
            rule, options = DEFAULT_RULE, {**DEFAULT_OPTIONS, **options}
        selected = select_epoch(self.history, rule, **options)
        return None if selected is None else int(self.history[selected]["epoch"])

    def most_misaligned(self, k: int, epoch: int | str = "best") -> Tensor:
        """``(min(k, M),)`` dataset indices with the lowest mean score over one epoch, lowest
        first (``M`` samples seen in that epoch).

        Args:
            k: how many indices.
            epoch: ``"best"`` (default): the epoch selected by the ``GWAEarlyStopping`` in the
                same Trainer, or, without one, :meth:`best_epoch` (the default rule). ``"last"``:
                the last finished epoch. An ``int``: that epoch.

        Raises:
            ValueError: when that epoch's per-sample scores were not kept (they are with
                ``keep_history=True`` and dataset indices in the batches), or no epoch is
                selected.
        """
        if epoch == "best":
            by = "the GWAEarlyStopping" if self._selector is not None else "best_epoch()"
            chosen = self._selector.best_epoch if self._selector is not None else self.best_epoch()
            if chosen is None:
                raise ValueError(
                    f"most_misaligned(epoch='best'): {by} has selected no epoch (no finite GWA "
                    "yet, or, with 'max_after_first_min', GWA has not risen after falling). "
                    "Pass epoch='last' or an epoch number."
                )
        elif epoch == "last":
            if self.keep_history and self._score_history_epochs:
                chosen = self._score_history_epochs[-1]
            else:
                scores = getattr(self, "_last_epoch_mean", None)
                if scores is None:
                    raise ValueError(
                        "most_misaligned(epoch='last'): no finished epoch with per-sample "
                        "scores; the batches need dataset indices (IndexedDataset and the "
                        "`indices` argument)."
                    )
                return _lowest(scores, k)
        elif isinstance(epoch, int) and not isinstance(epoch, bool):
            chosen = epoch
        else:
            raise ValueError(f"epoch must be 'best', 'last' or an epoch number, got {epoch!r}")
        if not self.keep_history:
            raise ValueError(
                f"most_misaligned(epoch={epoch!r}) needs the per-sample scores of epoch {chosen}, "
                "which are kept only with GradientWeightAlignment(keep_history=True); "
                "epoch='last' works without it."
            )
        if chosen not in self._score_history_epochs:
            raise ValueError(
                f"most_misaligned(epoch={epoch!r}): no per-sample scores for epoch {chosen}; "
                f"epochs with scores: {self._score_history_epochs}. The batches need dataset "
                "indices (IndexedDataset and the `indices` argument)."
            )
        return _lowest(self._score_history[self._score_history_epochs.index(chosen)], k)

    def _probe_exclusions(self) -> dict[str, str]:
        """Parameter name to the reason the probe left it out (when no backward produced
        statistics, there is no ``ProbeStats.excluded`` to read it from)."""
        if self.probe is None:
            return {}
        return {
            name: owner.skip_reason
            for owner in self.probe._owners
            if owner.skip_reason is not None
            for name in owner.local_to_name.values()
        }

    def _warn_excluded(self, names: list[str], excluded: dict[str, str]) -> None:
        """Once: a scored weight got no per-sample statistics; name it and the probe's reason."""
        missing = [n for n in self.score_names if n not in names and n in excluded]
        if not missing:
            return
        self._warned_excluded = True
        reasons = "; ".join(f"{n}: {excluded[n]}" for n in missing)
        consequence = (
            "GWA has no scores at all, so gwa/epoch is not logged and GWAEarlyStopping cannot "
            "select an epoch"
            if not names
            else f"the scores use only {names}"
        )
        rank_zero_warn(
            f"GradientWeightAlignment: the probe excluded {missing} ({reasons}), so "
            f"{consequence}. Score other weights with params=[...] (names from "
            "model.named_parameters()), or change the layer as the reason says."
        )

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            head_name=self.head_name,
            history=[dict(h) for h in self.history],
            layer_history={k: list(v) for k, v in self.layer_history.items()},
            epoch_metric=_metric_state(self._epoch_metric),
            layer_metrics={k: _metric_state(m) for k, m in self._layer_metrics.items()},
            latest=None if self._latest is None else self._latest.cpu(),
            epoch_sum=None if self._epoch_sum is None else self._epoch_sum.cpu(),
            epoch_count=None if self._epoch_count is None else self._epoch_count.cpu(),
            score_history=list(self._score_history),
            score_history_epochs=list(self._score_history_epochs),
            num_indices=self._num_indices,
            last_epoch_mean=getattr(self, "_last_epoch_mean", None),
            # the epoch the unfinished sums above belong to
            sums_epoch=None if self._trainer is None else self._trainer.current_epoch,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._mode == HEAD and state_dict.get("head_name") is not None:
            self.head_name = state_dict["head_name"]
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.layer_history = {k: list(v) for k, v in state_dict.get("layer_history", {}).items()}
        if "epoch_metric" in state_dict:
            _load_metric_state(self._epoch_metric, state_dict["epoch_metric"])
        for name, metric_state in state_dict.get("layer_metrics", {}).items():
            metric = self._layer_metrics.setdefault(name, AlignmentMoments(self.histogram_bins))
            _load_metric_state(metric, metric_state)
        self._latest = state_dict.get("latest")
        self._epoch_sum = state_dict.get("epoch_sum")
        self._epoch_count = state_dict.get("epoch_count")
        self._score_history = list(state_dict.get("score_history", []))
        if "score_history_epochs" in state_dict:
            self._score_history_epochs = [int(e) for e in state_dict["score_history_epochs"]]
        elif len(self._score_history) == len(self.history):
            # A checkpoint from before the epochs were stored: one row per recorded epoch.
            self._score_history_epochs = [int(h["epoch"]) for h in self.history]
        else:
            self._score_history_epochs = []
        self._num_indices = int(state_dict.get("num_indices", 0))
        if state_dict.get("last_epoch_mean") is not None:
            self._last_epoch_mean = state_dict["last_epoch_mean"]
        self._restored_epoch = state_dict.get("sums_epoch")
        self._epoch_finalized = False


def _effective_in_place_of_sources(
    names: list[str], reparametrized: dict[str, tuple[str, list[str]]]
) -> list[str]:
    """``names`` with the sources of each reparametrized tensor replaced by the tensor itself
    (``fc.parametrizations.weight.original`` -> ``fc.weight``), as in head mode: the cosine
    against a source is another quantity (identically 0 for a scale-invariant
    parametrization such as spectral_norm). Sources of a reparametrized bias are dropped."""
    replaced_by = {
        source: None if (name == "bias" or name.endswith(".bias")) else name
        for name, (_, sources) in reparametrized.items()
        for source in sources
    }
    kept = [replaced_by.get(n, n) for n in names]
    return list(dict.fromkeys(n for n in kept if n is not None))


def _lowest(epoch_scores: Tensor, k: int) -> Tensor:
    """``(min(k, M),)`` indices of the ``k`` lowest non-NaN entries of ``(N,)`` scores."""
    seen = torch.nonzero(~torch.isnan(epoch_scores)).flatten()
    order = torch.argsort(epoch_scores[seen], stable=True)[:k]
    return seen[order]


def _warn_if_checked_at_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Warn when an ``EarlyStopping``/``ModelCheckpoint`` monitoring a ``gwa/`` key may act at
    the end of validation: validation runs before the training epoch ends, so it would rank
    each epoch by the previous epoch's GWA."""
    if not overrides("validation_step", pl_module):
        return
    every_epoch_end = trainer.check_val_every_n_epoch == 1 and trainer.val_check_interval == 1.0
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        monitor = getattr(callback, "monitor", None)
        if not (isinstance(monitor, str) and monitor.startswith("gwa/")):
            continue
        if isinstance(callback, EarlyStopping):
            flag, value = "check_on_train_epoch_end", callback._check_on_train_epoch_end
        elif isinstance(callback, ModelCheckpoint):
            flag, value = "save_on_train_epoch_end", callback._save_on_train_epoch_end
        else:
            continue
        # Unset, both resolve to the training epoch end only when validation runs once at the
        # end of every epoch (Lightning's EarlyStopping.setup and ModelCheckpoint rules).
        if value is True or (value is None and every_epoch_end):
            continue
        rank_zero_warn(
            f"{type(callback).__name__}(monitor={monitor!r}) may act at the end of validation, "
            f"which runs before the training epoch's GWA is computed, so it would judge each "
            f"epoch by the previous epoch's value. Pass {type(callback).__name__}(..., "
            f"{flag}=True)."
        )


def _is_bias(name: str) -> bool:
    """Whether a ``named_parameters()`` name is a module's ``bias``."""
    return name.rsplit(".", 1)[-1] == "bias"


def _dataset_length(trainer: pl.Trainer) -> int | None:
    """The number of dataset indices when Lightning has a single map-style training dataset,
    else None. A ``Subset`` keeps the indices of the dataset it selects from (a subset of an
    ``IndexedDataset`` yields the full dataset's indices), so the bound is that dataset's
    length."""
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def _metric_state(metric: AlignmentMoments) -> dict[str, Tensor]:
    state = {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}  # type: ignore[union-attr]
    state["shift"] = torch.tensor(metric.shift, dtype=torch.float64)
    return state


def _load_metric_state(metric: AlignmentMoments, state: dict[str, Tensor]) -> None:
    state = dict(state)
    metric.shift = float(state.pop("shift", 0.0))
    for key, value in state.items():
        current = getattr(metric, key)
        setattr(metric, key, value.to(device=current.device, dtype=current.dtype))
    if float(state.get("count", torch.zeros(()))) > 0:
        metric._update_count = max(metric._update_count, 1)
    metric._computed = None


class _HeadDetector:
    """Watches one training forward pass to find the head: the last ``nn.Linear`` (among the
    candidates) whose output tensor is, unchanged, an output of an outermost module call of
    the LightningModule's tree (the model output handed to the loss).

    Outputs of a model (a container such as the LightningModule's ``forward`` or an
    ``nn.Sequential``) are preferred to a bare ``nn.Linear`` called directly from
    ``training_step`` (e.g. an auxiliary probe); the latter is the head only when no model
    output is a Linear output.

    Under a wrapping strategy (DDP, ``ddp_spawn``) Lightning runs ``training_step`` as a call
    of the LightningModule itself (its ``forward`` temporarily patched on the instance to
    ``training_step``), so the outermost call returns the loss. With ``redirected=True`` that
    call is transparent: the calls it makes are the outermost ones, as without a wrapper.
    """

    def __init__(self, pl_module: nn.Module, candidates: set[str], redirected: bool) -> None:
        self.root = pl_module
        self.redirected = redirected
        # One entry per open call of a watched module: whether it counts as a nesting level.
        self.counted: list[bool] = []
        self.names = {id(m): n for n, m in pl_module.named_modules()}
        self.candidate_modules = {
            id(m): f"{n}.weight" if n else "weight"
            for n, m in pl_module.named_modules()
            if isinstance(m, nn.Linear) and (f"{n}.weight" if n else "weight") in candidates
        }
        self.depth = 0
        self.linear_outputs: list[tuple[str, Tensor]] = []
        self.model_outputs: list[Tensor] = []
        self.bare_outputs: list[Tensor] = []
        module_hooks = torch.nn.modules.module
        self.handles = [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post),
        ]

    def _is_redirected_step(self, module: nn.Module) -> bool:
        """The wrapper's call of the LightningModule that runs ``training_step``."""
        return (
            self.redirected
            and module is self.root
            and self.depth == 0
            and "forward" in vars(module)  # Lightning's instance-level forward patch
        )

    def _pre(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self.names:
            return
        counted = not self._is_redirected_step(module)
        self.counted.append(counted)
        self.depth += counted

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) not in self.names or not self.counted:
            return
        if not self.counted.pop():
            return
        self.depth -= 1
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
        name = self.candidate_modules.get(id(module))
        if name is not None and len(tensors) == 1:
            self.linear_outputs.append((name, tensors[0]))
        if self.depth == 0:
            bare = isinstance(module, nn.Linear)
            (self.bare_outputs if bare else self.model_outputs).extend(tensors)

    def finish(self) -> str | None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        found: list[str] = []
        for outputs in (self.model_outputs, self.bare_outputs):
            top = {id(t) for t in outputs}
            found = [name for name, out in self.linear_outputs if id(out) in top]
            if found:
                break
        self.linear_outputs, self.model_outputs, self.bare_outputs = [], [], []
        return found[-1] if found else None


def the_gwa_callback(trainer: pl.Trainer, user: str, missing_hint: str) -> GradientWeightAlignment:
    """The single :class:`GradientWeightAlignment` in ``trainer.callbacks``, for a callback
    (``user``) that acts on its scores.

    Raises:
        ValueError: there is none (the message ends with ``missing_hint``: what to add), or
            several, so that the one to follow is ambiguous.
    """
    found = [c for c in trainer.callbacks if isinstance(c, GradientWeightAlignment)]  # type: ignore[attr-defined]
    if not found:
        raise ValueError(
            f"{user} needs a GradientWeightAlignment callback in the same Trainer: {missing_hint}"
        )
    if len(found) > 1:
        raise ValueError(
            f"{user} found {len(found)} GradientWeightAlignment callbacks in the Trainer and "
            f"cannot tell which one to follow; keep a single one."
        )
    return found[0]
