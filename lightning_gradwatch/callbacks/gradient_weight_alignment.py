"""Gradient-weight alignment (Hoelzl, Rueckert, Kaissis, NeurIPS 2025) as a Lightning callback.

The callback itself is thin; each concept has its own module:

- ``_gwa_head``: which weights are scored (head detection with global module hooks);
- ``_gwa_aggregate``: the per-epoch aggregate and the histogram of the scores;
- ``_gwa_samples``: per-sample attribution by dataset index and its merge across ranks;
- ``_gwa_csv``: the per-epoch CSV files;
- ``_gwa_checks``: warnings about how the callback is wired into the Trainer.

Other callbacks use its public contract only: :attr:`GradientWeightAlignment.mode`,
:attr:`~GradientWeightAlignment.head_name`, :attr:`~GradientWeightAlignment.history`,
:meth:`~GradientWeightAlignment.finalize_epoch`,
:meth:`~GradientWeightAlignment.sample_scores` and
:meth:`~GradientWeightAlignment.set_epoch_selector` (``docs/gwa.md``, "Working with other
callbacks").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from .. import keys
from .._lightning import training_step_redirected
from ..data import INDEX_KEY, IndexSpec, batch_indices
from ..functional.stopping import select_epoch
from ..loggers import (
    add_custom_scalars,
    is_logging_step,
    log_headline_step,
    log_histogram_raw,
    warn_if_no_logger,
)
from ..probe import ProbeStats
from ..probe.rules.parametrized import reparametrized_tensors
from ._gwa_aggregate import EpochAggregate, zoomed_histogram
from ._gwa_checks import (
    dataset_length,
    probe_exclusions,
    warn_if_checked_at_validation,
    warn_if_stopper_comes_first,
)
from ._gwa_csv import write_epoch_scores
from ._gwa_head import HeadDetector, effective_in_place_of_sources, head_candidates, is_bias
from ._gwa_samples import SampleScores, lowest
from ._probe_callback import ProbeCallback
from ._stopping_default import DEFAULT_OPTIONS, DEFAULT_RULE

HEAD = "head"
ALL = "all"
NAMES = "names"

#: Kept importable under its former name.
_HeadDetector = HeadDetector


class EpochSelector(Protocol):
    """What :meth:`GradientWeightAlignment.set_epoch_selector` accepts: anything with a
    ``best_epoch`` (``None`` while it has selected none), e.g. :class:`GWAEarlyStopping`."""

    @property
    def best_epoch(self) -> int | None: ...


class GradientWeightAlignment(ProbeCallback):
    """Per-sample gradient-weight alignment scores and the paper's per-epoch aggregate.

    For every training sample ``i`` of every training batch (every micro-batch under gradient
    accumulation), before the optimizer step, the score is ``gamma_i = cos(-g_i, w)``: the
    cosine between sample ``i``'s descent direction and the selected weights ``w`` (weights
    only, never biases). At the end of each training epoch, over all samples of the epoch and
    all ranks, the aggregate is ``GWA = mean(gamma) / (excess_kurtosis(gamma) + 1.2)`` with the
    biased (Fisher) kurtosis.

    Logged through ``pl_module.log`` (monitorable by ``EarlyStopping``/``ModelCheckpoint``;
    the names are those of :mod:`lightning_gradwatch.keys`):

    - ``gwa/aggregate``: the aggregate, each epoch; ``gwa/mean`` and ``gwa/kurtosis``: its
      parts.
    - ``gwa/step_mean``: the mean score of the training batch, on Lightning's
      ``log_every_n_steps`` schedule (this rank's batch; not synchronised).
    - ``gwa_layers/aggregate/<param name>``: in multi-layer mode, the aggregate of each
      layer's own scores (``w`` = that layer's weight), each epoch.

    With a TensorBoard logger it also writes the histogram ``gwa/scores`` of the epoch's
    scores (all ranks), over the range the scores fill, and a custom-scalars layout grouping
    the curves.

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
        histogram_bins: at most this many bins in the TensorBoard histogram ``gwa/scores``,
            which spans the range the epoch's scores fill (to a resolution of 5e-4).
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

    #: Non-finite backward passes (AMP overflow) are masked out on the device, so no step
    #: reads their finiteness to the host (see ProbeCallback.handles_nonfinite).
    handles_nonfinite = True

    def __init__(
        self,
        params: str | Sequence[str] = HEAD,
        indices: IndexSpec = INDEX_KEY,
        keep_history: bool = True,
        write_scores: bool = False,
        histogram_bins: int = 60,
        loss_reduction: str = "mean",
        backward: int | None = None,
    ) -> None:
        super().__init__(loss_reduction=loss_reduction, backward=backward)  # type: ignore[arg-type]
        if isinstance(params, str):
            self._mode = params if params in (HEAD, ALL) else NAMES
            self._names: list[str] = [] if params in (HEAD, ALL) else [params]
        else:
            self._mode = NAMES
            self._names = list(dict.fromkeys(params))
            if not self._names:
                raise ValueError("params is an empty list; pass 'head', 'all' or weight names")
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int):
            raise ValueError(f"histogram_bins must be an integer >= 1, got {histogram_bins!r}")
        if histogram_bins < 1:
            raise ValueError(f"histogram_bins must be >= 1, got {histogram_bins}")
        self.indices = indices
        self.keep_history = keep_history
        self.write_scores = write_scores
        self.histogram_bins = histogram_bins

        self.head_name: str | None = None
        #: one dict per finished epoch: ``epoch``, ``gwa``, ``mean``, ``kurtosis``, ``count``.
        self.history: list[dict[str, float]] = []
        #: per-layer aggregate per finished epoch (multi-layer mode): ``{name: [gwa, ...]}``.
        self.layer_history: dict[str, list[float]] = {}

        self._aggregate = EpochAggregate()
        self._samples = SampleScores(indices, keep_history)
        self._candidates: list[str] = []
        self._detector: HeadDetector | None = None
        self._epoch_finalized = False
        self._warned_no_indices = False
        self._selector: EpochSelector | None = None
        self._warned_excluded = False
        self._scored_any_batch = False  # plain bool: set on the first batch with scores
        self._checked_first_batch = False
        # Pending per-sample records are checked synchronously until the first batch's are.
        self._indices_checked = False
        # Epoch of the unfinished sums restored from a checkpoint (None: none restored).
        self._restored_epoch: int | None = None
        self._state_key_cache: tuple[tuple[Any, ...], int | None, str] | None = None

    # ------------------------------------------------------------------ public contract
    @property
    def mode(self) -> str:
        """``"head"``, ``"all"`` or ``"names"`` (weights named by ``params``); read-only."""
        return self._mode

    @property
    def score_names(self) -> list[str]:
        """The weights whose concatenation is scored (known after the first batch in head
        mode)."""
        if self._mode == HEAD:
            return [self.head_name] if self.head_name is not None else []
        return list(self._names)

    @property
    def multi_layer(self) -> bool:
        """Whether per-layer aggregates are computed and logged (``"all"``, or two or more
        names)."""
        return self._mode == ALL or len(self._names) > 1

    @property
    def epoch_selector(self) -> EpochSelector | None:
        """The callback whose ``best_epoch`` ``most_misaligned(epoch="best")`` uses, if any."""
        return self._selector

    def set_epoch_selector(self, selector: EpochSelector | None) -> None:
        """Register the callback that selects epochs from this callback's GWA (``None``:
        none). :class:`GWAEarlyStopping` registers itself at ``setup``, so that
        ``most_misaligned(k, epoch="best")`` ranks the samples of the epoch it selects."""
        self._selector = selector

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it around every hook call (profiler labels): built once per value
        # of what it depends on, which is compared by identity here.
        mode, indices = self._mode, self.indices
        names = self._names if mode == NAMES else None
        cached = getattr(self, "_state_key_cache", None)
        if cached is not None:
            (cached_mode, cached_names, cached_indices), backward, key = cached
            if (
                cached_mode is mode
                and cached_names is names
                and cached_indices is indices
                and backward == self.backward
            ):
                return key
        inputs = (mode, names, indices)
        # Two instances scoring different weights keep separate checkpoint entries.
        params: str | list[str] = self._mode if self._mode in (HEAD, ALL) else self._names
        indices = self.indices
        if callable(indices):  # a function's repr holds its address, which changes per run
            indices = getattr(indices, "__qualname__", type(indices).__qualname__)
        key = self._generate_state_key(params=params, indices=indices, backward=self.backward)
        self._state_key_cache = (inputs, self.backward, key)
        return key

    @override
    def probe_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        named = dict(pl_module.named_parameters())
        if self._mode == HEAD:
            if self.head_name is not None:
                return [self.head_name]
            self._candidates = head_candidates(pl_module)
            if not self._candidates:
                raise ValueError(
                    "GradientWeightAlignment(params='head') found no trainable nn.Linear in the "
                    "model, so it has no classifier head to score. Name the weight to score, "
                    f"e.g. params='<module>.weight', from {list(named)[:8]}"
                )
            return self._candidates
        if self._mode == ALL:
            self._names = [n for n, p in named.items() if p.requires_grad and not is_bias(n)]
            self._names = effective_in_place_of_sources(
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
        biases = [n for n in self._names if is_bias(n)]
        if biases:
            weights = [n for n in self._names if not is_bias(n)]
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
            self._aggregate.add_layers(self._names)
        self._indices_checked = False
        warn_if_stopper_comes_first(trainer, self)
        warn_if_checked_at_validation(trainer, pl_module)

    def _own_tensor_state(self) -> None:
        """Give this process its own copy of every accumulating tensor.

        ``ddp_spawn`` pickles the callback into each worker, and torch pickles CPU tensors as
        handles to one shared-memory block: without a copy, every rank would add its scores
        into the same storage (epoch counts and histograms multiplied by the world size).
        """
        self._aggregate.own_copies()
        self._samples.own_copies()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples.dataset_length = dataset_length(trainer)
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
        if epoch is None or float(self._aggregate.epoch.count) == 0:
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
            self._finalize(trainer, pl_module, restored_epoch=epoch)
            # Lightning starts the resumed epoch without on_train_epoch_start
            self._epoch_finalized = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        charts = {
            "aggregate": [keys.GWA_AGGREGATE, keys.GWA_MEAN, keys.GWA_KURTOSIS],
            "step": [keys.GWA_STEP_MEAN],
        }
        if self.multi_layer:
            charts["per-layer GWA"] = [keys.layer_pattern(keys.GWA_FAMILY, "aggregate")]
        add_custom_scalars(trainer, "gradient-weight alignment", charts)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_finalized = False
        self._aggregate.to(pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._mode == HEAD and self.head_name is None and self._detector is None:
            self._detector = HeadDetector(
                pl_module,
                set(self._candidates),
                redirected=training_step_redirected(trainer, pl_module),
            )
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        super().on_before_backward(trainer, pl_module, loss)
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
                self._warn_excluded([], probe_exclusions(self.probe))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._detector is not None:  # the forward never reached backward (skipped step)
            self._detector.finish()
            self._detector = None
        probe = self.probe
        if (
            self._mode == HEAD
            and self.head_name is not None
            and probe is not None
            and (len(probe.param_names) != 1 or probe.param_names[0] != self.head_name)
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
        if self._mode == HEAD:
            head = self.head_name
            names = [head] if head is not None and head in stats.dot else []
        else:
            names = [n for n in self._names if n in stats.dot]
        if not self._warned_excluded:
            self._warn_excluded(names, stats.excluded)
        if not names or stats.batch_size == 0:
            return
        self._scored_any_batch = True
        # The epoch's aggregate scores its batches together, later (see EpochAggregate); this
        # batch's own scores are formed only when something here uses them.
        self._aggregate.update(stats, names, self.multi_layer)
        scores: Tensor | None = None
        # Lightning writes on-step metrics only on its log_every_n_steps schedule; the helper
        # skips the call (and its synchronisation) on the other steps.
        logging = is_logging_step(trainer)
        if logging:
            scores = stats.alignment(names)
            log_headline_step(
                pl_module, {keys.GWA_STEP_MEAN: scores.mean().float()}, batch_size=len(scores)
            )
        indices = batch_indices(batch, self.indices, stats.batch_size)
        if indices is None:
            if self.indices is not None and not self._warned_no_indices:
                self._warned_no_indices = True
                rank_zero_warn(
                    f"GradientWeightAlignment: no dataset indices in the training batch "
                    f"(indices={self.indices!r}), so per-sample scores are not attributed. Wrap "
                    f"the dataset in lightning_gradwatch.IndexedDataset and pass the right "
                    f"`indices` (e.g. -1 for tuple batches), or indices=None to silence this."
                )
            return
        if scores is None:
            scores = stats.alignment(names)
        self._samples.record(
            indices.to(scores.device), scores.detach().to(torch.float64), valid=stats.finite
        )
        # Wrong indices are refused at the first batch (checked now); later batches' checks
        # are read back with the next logging step's values, or at the epoch's end.
        if not self._indices_checked or logging:
            self._samples.flush()
            self._indices_checked = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ epoch aggregate
    def finalize_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute, log and store the epoch's aggregate, once per epoch (later calls in the
        same epoch do nothing).

        A collective: every rank calls it, from a training-epoch-end hook. This callback calls
        it from its own ``on_train_epoch_end``; a callback that reads :attr:`history` at the
        epoch's end (as :class:`GWAEarlyStopping` does) calls it first, so that the order of
        the callbacks in the Trainer does not matter.
        """
        self._finalize(trainer, pl_module)

    def _finalize(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        restored_epoch: int | None = None,
    ) -> None:
        """``restored_epoch``: the sums restored from a checkpoint written after that epoch's
        last batch, whose end hooks Lightning does not run on resume: stored, not logged
        (Lightning skips that epoch's own epoch-end logging too)."""
        if self._epoch_finalized:
            return
        self._epoch_finalized = True
        result, layer_results = self._aggregate.compute()
        epoch = trainer.current_epoch if restored_epoch is None else restored_epoch
        self._finalize_samples(trainer, epoch=epoch, write=restored_epoch is None)
        if float(result["count"]) == 0:
            return
        entry = {"epoch": float(epoch)}
        entry.update({k: float(result[k]) for k in ("gwa", "mean", "kurtosis", "count")})
        self.history.append(entry)
        for name, layer in layer_results.items():
            self.layer_history.setdefault(name, []).append(float(layer["gwa"]))
        if restored_epoch is not None:
            return
        # Identical on every rank (computed from all ranks' sums); sync_dist only keeps
        # Lightning's check for distributed epoch-level logging quiet.
        epoch_values = {
            keys.GWA_AGGREGATE: entry["gwa"],
            keys.GWA_MEAN: entry["mean"],
            keys.GWA_KURTOSIS: entry["kurtosis"],
            # A layer the probe left out all epoch has no aggregate (NaN): not written.
            **{
                keys.layer_key(keys.GWA_FAMILY, "aggregate", name): float(layer["gwa"])
                for name, layer in layer_results.items()
                if float(layer["count"]) > 0
            },
        }
        for key, value in epoch_values.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        histogram = zoomed_histogram(result["histogram_counts"], self.histogram_bins)
        if histogram is not None:
            n = result["count"]
            log_histogram_raw(
                trainer,
                keys.GWA_SCORES,
                *histogram,
                total=float(result["mean"] * n),
                total_squares=float(result["sum_squares"]),
                step=trainer.global_step,
            )

    # ------------------------------------------------------------------ per-sample scores
    def _finalize_samples(self, trainer: pl.Trainer, epoch: int, write: bool = True) -> None:
        """Merge epoch ``epoch``'s per-sample sums across ranks and append the epoch means
        (and write them when ``write_scores`` and ``write``)."""
        if self.indices is None:
            return
        if trainer.world_size > 1 and not self._samples.merge_ranks(
            trainer, self._aggregate.epoch.count.device
        ):
            return
        epoch_mean = self._samples.finish_epoch(epoch)
        if epoch_mean is not None and self.write_scores and write and trainer.is_global_zero:
            write_epoch_scores(trainer, trainer.current_epoch, epoch_mean)

    def sample_scores(self) -> dict[str, Tensor]:
        """Per-sample scores of every dataset index seen, as CPU tensors of equal length.

        Returns:
            ``{"index": (M,) int64, "score": (M,) latest score, "epoch_mean": (M,) mean over
            the last finished epoch (NaN if not seen in it)}``. ``pandas.DataFrame(...)``
            of it is a table. Empty tensors before any indexed batch.
        """
        return self._samples.sample_scores()

    def score_history(self) -> Tensor:
        """``(epochs, N)`` float32 per-sample mean score of each finished epoch (NaN where a
        sample was not seen), ``N`` the largest index seen plus one."""
        return self._samples.score_history()

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
            epoch: ``"best"`` (default): the epoch selected by the registered epoch selector
                (the ``GWAEarlyStopping`` in the same Trainer, :meth:`set_epoch_selector`),
                or, without one, :meth:`best_epoch` (the default rule). ``"last"``: the last
                finished epoch. An ``int``: that epoch.

        Raises:
            ValueError: when that epoch's per-sample scores were not kept (they are with
                ``keep_history=True`` and dataset indices in the batches), or no epoch is
                selected.
        """
        samples = self._samples
        if epoch == "best":
            selector = self._selector
            by = f"the {type(selector).__name__}" if selector is not None else "best_epoch()"
            chosen = selector.best_epoch if selector is not None else self.best_epoch()
            if chosen is None:
                raise ValueError(
                    f"most_misaligned(epoch='best'): {by} has selected no epoch (no finite GWA "
                    "yet, or, with 'max_after_first_min', GWA has not risen after falling). "
                    "Pass epoch='last' or an epoch number."
                )
        elif epoch == "last":
            if self.keep_history and samples.history_epochs:
                chosen = samples.history_epochs[-1]
            else:
                if samples.last_epoch_mean is None:
                    raise ValueError(
                        "most_misaligned(epoch='last'): no finished epoch with per-sample "
                        "scores; the batches need dataset indices (IndexedDataset and the "
                        "`indices` argument)."
                    )
                return lowest(samples.last_epoch_mean, k)
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
        if chosen not in samples.history_epochs:
            raise ValueError(
                f"most_misaligned(epoch={epoch!r}): no per-sample scores for epoch {chosen}; "
                f"epochs with scores: {samples.history_epochs}. The batches need dataset "
                "indices (IndexedDataset and the `indices` argument)."
            )
        return lowest(samples.history[samples.history_epochs.index(chosen)], k)

    def _warn_excluded(self, names: list[str], excluded: dict[str, str]) -> None:
        """Once: a scored weight got no per-sample statistics; name it and the probe's reason."""
        missing = [n for n in self.score_names if n not in names and n in excluded]
        if not missing:
            return
        self._warned_excluded = True
        reasons = "; ".join(f"{n}: {excluded[n]}" for n in missing)
        consequence = (
            f"GWA has no scores at all, so {keys.GWA_AGGREGATE} is not logged and "
            "GWAEarlyStopping cannot select an epoch"
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
        epoch_metric, layer_metrics = self._aggregate.state()
        state.update(
            head_name=self.head_name,
            history=[dict(h) for h in self.history],
            layer_history={k: list(v) for k, v in self.layer_history.items()},
            epoch_metric=epoch_metric,
            layer_metrics=layer_metrics,
            **self._samples.state(),
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
        self._aggregate.load_state(
            state_dict.get("epoch_metric"), state_dict.get("layer_metrics", {})
        )
        self._samples.load_state(state_dict, [int(h["epoch"]) for h in self.history])
        self._restored_epoch = state_dict.get("sums_epoch")
        self._epoch_finalized = False


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
