"""Sample reweighting from gradient-weight alignment scores: :class:`GWAReweighting`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from .. import keys
from ..data import batch_indices
from ..loggers import is_logging_step, log_headline_step, log_histogram
from .gradient_weight_alignment import GradientWeightAlignment, the_gwa_callback

Rule = Literal["clip", "sigmoid", "rank", "mixture"]
Apply = Literal["hook", "manual"]
RULES: tuple[str, ...] = ("clip", "sigmoid", "rank", "mixture")

#: Raw weights below this count as "down-weighted" in the logged fraction.
DOWN_WEIGHTED_BELOW = 0.5


class GWAReweighting(Callback):
    """Reweights each training sample's gradient by a function of its alignment score.

    Scores come from the :class:`GradientWeightAlignment` callback of the same Trainer (found
    at ``setup``), looked up by dataset index. At the start of every epoch after the warm-up,
    the per-sample mean scores of the previous epoch (merged over all ranks by the alignment
    callback) are folded into a score table (an exponential moving average across epochs when
    ``ema < 1``), and a rule turns the table into a raw weight in ``[0, 1]`` per sample. In each
    training batch the raw weights of its samples are normalised to mean 1 over the batch (over
    all ranks' batches of the step under DDP), so the effective learning rate is unchanged.
    Samples never scored get raw weight 1; during the warm-up every weight is 1.

    Rules (``s`` is a sample's smoothed score, over the samples scored so far):

    - ``"clip"`` (default): ``1`` if ``s >= threshold`` else ``0``; with the default threshold
      0, the samples whose descent direction points away from the weights are left out.
    - ``"sigmoid"``: ``sigmoid((s - threshold) / (temperature * std(s)))``; the temperature is
      in units of the scores' standard deviation over the dataset, so it does not depend on
      the scale of the scores.
    - ``"rank"``: ``0`` for the ``fraction`` of the dataset with the lowest scores, else ``1``
      (a dataset-wide quantile, not a per-batch one: a batch of clean samples is not forced to
      drop any of them).
    - ``"mixture"``: a two-component Gaussian mixture fitted to the scores; the raw
      weight is the posterior probability of the higher-mean component. When the two
      components are not separated (Ashman's ``D < separation``, e.g. clean data with a
      unimodal score distribution), every weight is 1.

    How weights are applied (``apply="hook"``, the default): a forward hook on the output
    module (the alignment callback's head, or ``output_module``) multiplies the backprop of
    row ``i`` of its output by ``w_i``. This is exact when each sample's loss depends only on
    its own output row and the batch loss is their mean or sum: the parameter gradients are
    then those of ``mean_i w_i l_i`` (or ``sum_i w_i l_i``). With ``apply="manual"`` nothing is
    hooked; call :meth:`weights_for` in ``training_step`` and weight your per-sample losses.

    The hook runs before the monitoring probes' hooks on the same output, so
    ``GradientWeightAlignment``, ``GradientSNR`` and the other monitoring callbacks in the same
    Trainer report the statistics of the reweighted gradients, the ones actually used.

    Logged on Lightning's logging steps (through ``pl_module.log``): ``reweight/raw_mean`` (the
    batch's mean raw weight: the share of the batch the rule keeps), ``reweight/min`` (the
    smallest normalised weight) and ``reweight/down_weighted`` (fraction of the batch with raw
    weight below 0.5); each epoch after the warm-up, ``reweight/table_down_weighted`` (the same
    fraction over the dataset) and, with a TensorBoard logger, the histogram
    ``reweight/weights`` of the raw weights of the dataset.

    Example::

        >>> from lightning_gradwatch import GradientWeightAlignment, GWAReweighting
        >>> callbacks = [GradientWeightAlignment(), GWAReweighting()]
        >>> trainer = pl.Trainer(callbacks=callbacks)  # doctest: +SKIP

    Args:
        rule: ``"clip"``, ``"sigmoid"``, ``"rank"`` or ``"mixture"`` (see above;
            ``docs/reweighting.md`` has the study behind the default).
        warmup_epochs: epochs trained with all weights 1 (at least 1: the first epoch has no
            scores yet).
        ema: weight of the newest epoch in the score table; ``1.0`` uses the last epoch only.
        threshold: the score threshold of ``"clip"`` and ``"sigmoid"``.
        temperature: the temperature of ``"sigmoid"``, in standard deviations of the scores.
        fraction: the fraction of the dataset ``"rank"`` down-weights.
        separation: the minimum Ashman's D for ``"mixture"`` to down-weight anything.
        output_module: the name (as in ``named_modules()``) of the module whose output rows
            are the samples' outputs; default the alignment callback's head.
        apply: ``"hook"`` (default) or ``"manual"`` (see above).
        state_key_suffix: distinguishes several instances in one Trainer's checkpoint.

    Raises:
        ValueError: a bad argument; at ``setup``, no ``GradientWeightAlignment`` in the
            Trainer, one with ``indices=None``, or an unknown ``output_module``.
        RuntimeError: at the first training batch, no dataset indices in the batch; at the
            first reweighted batch, an output whose dim 0 is not the batch's samples.
    """

    def __init__(
        self,
        rule: Rule = "clip",
        warmup_epochs: int = 3,
        ema: float = 1.0,
        threshold: float = 0.0,
        temperature: float = 0.5,
        fraction: float = 0.2,
        separation: float = 2.0,
        output_module: str | None = None,
        apply: Apply = "hook",
        state_key_suffix: str = "",
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if apply not in ("hook", "manual"):
            raise ValueError(
                f"apply must be 'hook' (scale the backprop at the output) or 'manual' (call "
                f"weights_for(batch) in training_step), got {apply!r}"
            )
        if warmup_epochs < 1:
            raise ValueError(
                f"warmup_epochs must be at least 1 (the first epoch has no scores), got "
                f"{warmup_epochs}"
            )
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.rule: Rule = rule
        self.warmup_epochs = warmup_epochs
        self.ema = ema
        self.threshold = threshold
        self.temperature = temperature
        self.fraction = fraction
        self.separation = separation
        self.output_module = output_module
        self.apply: Apply = apply
        self._state_key_suffix = state_key_suffix

        #: smoothed score per dataset index (float64, NaN = never scored), on the CPU.
        self.score_table: Tensor = torch.zeros(0, dtype=torch.float64)
        #: the last epoch whose scores were folded into the table (-1: none).
        self.scored_epoch = -1
        self._gwa: GradientWeightAlignment | None = None
        self._trainer: pl.Trainer | None = None
        self._raw_table: Tensor | None = None  # raw weight per index, on the module's device
        self._pending: Tensor | None = None  # this batch's weights, applied by the hook
        self._hooked: nn.Module | None = None
        self._handle: Any = None
        self._indices_checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule, suffix=self._state_key_suffix)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        gwa = the_gwa_callback(
            trainer,
            "GWAReweighting",
            "its alignment scores are what it weights by; add GradientWeightAlignment() to "
            "Trainer(callbacks=[...]) (and wrap the training dataset in "
            "lightning_gradwatch.IndexedDataset).",
        )
        if gwa.indices is None:
            raise ValueError(
                "GWAReweighting looks scores up by dataset index, but GradientWeightAlignment "
                "has indices=None. Wrap the training dataset in "
                "lightning_gradwatch.IndexedDataset and pass GradientWeightAlignment(indices=...)"
                " (the default 'index' for dict items, -1 for tuple items)."
            )
        if self.output_module is not None:
            modules = dict(pl_module.named_modules())
            if self.output_module not in modules:
                raise ValueError(
                    f"GWAReweighting(output_module={self.output_module!r}): no such module; "
                    f"pass a name from model.named_modules(), e.g. {list(modules)[1:9]}"
                )
        elif self.apply == "hook" and gwa.mode != "head":
            raise ValueError(
                "GWAReweighting applies weights at the model output, found from the alignment "
                "callback's head, but GradientWeightAlignment is not in head mode. Pass "
                "GWAReweighting(output_module='<name of the module producing the model "
                "output>') or apply='manual'."
            )
        self._gwa = gwa
        self._trainer = trainer
        self._indices_checked = False

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gwa = self._gwa
        if gwa is None:
            return
        finished = int(gwa.history[-1]["epoch"]) if gwa.history else -1
        if finished > self.scored_epoch:
            table = gwa.sample_scores()
            # A sample trained with weight 0 had a zero gradient, so its score last epoch is 0:
            # with "clip" at threshold 0 it is readmitted for one epoch and scored again (see
            # docs/reweighting.md: never re-examining dropped samples measured worse).
            self._fold(table["index"], table["epoch_mean"])
            self.scored_epoch = finished
        if not self._active(trainer) or self.score_table.numel() == 0:
            self._raw_table = None
            return
        raw = self._raw_weights_of_table()
        self._raw_table = raw.to(device=pl_module.device, dtype=torch.float32)
        scored = ~torch.isnan(self.score_table)
        down = (raw[scored] < DOWN_WEIGHTED_BELOW).double().mean() if scored.any() else 0.0
        # identical on every rank (the table is); sync_dist only keeps Lightning's DDP check quiet
        pl_module.log(
            keys.REWEIGHT_TABLE_DOWN_WEIGHTED,
            float(down),
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        log_histogram(trainer, keys.REWEIGHT_WEIGHTS, raw[scored], step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending = None
        if not self._indices_checked:
            # Refuse at the first batch, not only once the warm-up is over.
            self._indices_of(batch)
            self._indices_checked = True
        if self.apply != "hook" or self._raw_table is None:
            return
        self._ensure_hook(pl_module)
        self._pending = self.weights_for(batch)
        weights = self._pending
        if not is_logging_step(trainer):
            return  # nothing to compute: the values would not be written
        raw = self._raw_of(batch)
        log_headline_step(
            pl_module,
            {
                keys.REWEIGHT_RAW_MEAN: raw.mean(),
                keys.REWEIGHT_MIN: weights.min(),
                keys.REWEIGHT_DOWN_WEIGHTED: (raw < DOWN_WEIGHTED_BELOW).float().mean(),
            },
            batch_size=len(raw),
        )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._pending = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hook()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    # ------------------------------------------------------------------ weights
    def weights_for(self, batch: Any) -> Tensor:
        """``(B,)`` float32 weights of the batch's samples, normalised to mean 1 over the
        step's batch (summed over all ranks under DDP: a collective, so call it on every
        rank, once per training batch). All ones during the warm-up.

        For ``apply="manual"``: ``loss = (weights_for(batch) * per_sample_losses).mean()``.
        """
        raw = self._raw_of(batch)
        if self._raw_table is None:
            return raw
        trainer = self._trainer
        totals = torch.stack([raw.sum(), torch.tensor(float(raw.numel()), device=raw.device)])
        if trainer is not None and trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        # A step whose samples all have raw weight 0 has no mean-1 rescaling: it trains
        # unweighted rather than dividing by zero.
        return torch.where(totals[0] > 0, raw * (totals[1] / totals[0]), torch.ones_like(raw))

    def _raw_of(self, batch: Any) -> Tensor:
        """``(B,)`` raw weights in ``[0, 1]`` of the batch's samples (ones when inactive)."""
        indices = self._indices_of(batch)
        table = self._raw_table
        if table is None:
            return torch.ones(indices.numel(), device=indices.device)
        indices = indices.to(table.device)
        inside = indices < table.numel()
        # Indices past the table were never scored: weight 1.
        raw = table[torch.where(inside, indices, torch.zeros_like(indices))]
        return torch.where(inside, raw, torch.ones_like(raw))

    def _indices_of(self, batch: Any) -> Tensor:
        gwa = self._gwa
        if gwa is None:
            raise RuntimeError(
                "GWAReweighting is not set up: use it as a callback of the Trainer being fitted"
            )
        spec = gwa.indices
        found = spec(batch) if callable(spec) else _raw_indices(batch, spec)
        # batch_indices checks the count against the batch size; here the count is the size.
        indices = (
            None if found is None else batch_indices(batch, spec, torch.as_tensor(found).numel())
        )
        if indices is None:
            raise RuntimeError(
                f"GWAReweighting: no dataset indices in the training batch "
                f"(GradientWeightAlignment(indices={spec!r})). Wrap the training dataset in "
                f"lightning_gradwatch.IndexedDataset and pass the right `indices` to "
                f"GradientWeightAlignment (e.g. -1 for tuple batches)."
            )
        return indices

    def _fold(self, index: Tensor, epoch_mean: Tensor) -> None:
        seen = ~torch.isnan(epoch_mean)
        index, values = index[seen], epoch_mean[seen].double()
        if index.numel() == 0:
            return
        size = max(self.score_table.numel(), int(index.max()) + 1)
        if size > self.score_table.numel():
            grown = torch.full((size,), float("nan"), dtype=torch.float64)
            grown[: self.score_table.numel()] = self.score_table
            self.score_table = grown
        old = self.score_table[index]
        self.score_table[index] = torch.where(
            torch.isnan(old), values, self.ema * values + (1 - self.ema) * old
        )

    def _raw_weights_of_table(self) -> Tensor:
        return raw_weights(
            self.score_table,
            self.rule,
            threshold=self.threshold,
            temperature=self.temperature,
            fraction=self.fraction,
            separation=self.separation,
        )

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self.warmup_epochs

    # ------------------------------------------------------------------ hook
    def _ensure_hook(self, pl_module: pl.LightningModule) -> None:
        name = self.output_module
        if name is None:
            head = self._gwa.head_name if self._gwa is not None else None
            if head is None:
                raise RuntimeError(
                    "GWAReweighting: the alignment callback has not found its head yet; pass "
                    "GWAReweighting(output_module='<name of the output module>')"
                )
            name = head.rsplit(".", 1)[0] if "." in head else ""
        module = dict(pl_module.named_modules())[name]
        if module is self._hooked:
            return
        self._remove_hook()
        # prepend: runs before the probes' forward hooks, so the gradient hook it registers on
        # the output runs before theirs and they see the reweighted backprop.
        self._handle = module.register_forward_hook(self._scale_output, prepend=True)
        self._hooked = module

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._hooked = None, None

    def _scale_output(self, module: nn.Module, args: Any, output: Any) -> None:
        weights = self._pending
        if weights is None or not module.training or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or output.dim() == 0 or len(output) != len(weights):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise RuntimeError(
                f"GWAReweighting: the output of module {self._module_name(module)!r} has shape "
                f"{shape}, but the batch has {len(weights)} samples; its dim 0 must be the "
                f"samples. Pass output_module= naming a module whose output rows are the "
                f"samples, or use apply='manual' with weights_for(batch)."
            )
        if output.requires_grad:
            output.register_hook(_scale_rows(weights))

    def _module_name(self, module: nn.Module) -> str:
        trainer = self._trainer
        if trainer is None:
            return type(module).__name__
        for name, candidate in trainer.lightning_module.named_modules():
            if candidate is module:
                return name
        return type(module).__name__

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"score_table": self.score_table.clone(), "scored_epoch": self.scored_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.score_table = state_dict["score_table"].to(torch.float64).cpu()
        self.scored_epoch = int(state_dict["scored_epoch"])


def _scale_rows(weights: Tensor) -> Any:
    def hook(grad: Tensor) -> Tensor:
        return grad * weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))

    return hook


def _raw_indices(batch: Any, spec: Any) -> Any:
    """What ``spec`` (a dict key or a tuple position) finds in ``batch``, unchecked."""
    if isinstance(spec, str):
        return batch.get(spec) if isinstance(batch, Mapping) else None
    if isinstance(spec, int) and isinstance(batch, Sequence) and not isinstance(batch, str):
        return batch[spec] if -len(batch) <= spec < len(batch) else None
    return None


def raw_weights(
    scores: Tensor,
    rule: str,
    threshold: float = 0.0,
    temperature: float = 0.5,
    fraction: float = 0.2,
    separation: float = 2.0,
) -> Tensor:
    """``(N,)`` float64 raw weights in ``[0, 1]`` from ``(N,)`` scores (NaN: unscored, weight
    1), by the rules documented on :class:`GWAReweighting`."""
    scores = scores.double()
    scored = ~torch.isnan(scores)
    raw = torch.ones_like(scores)
    values = scores[scored]
    if values.numel() == 0:
        return raw
    if rule == "clip":
        raw[scored] = (values >= threshold).double()
    elif rule == "sigmoid":
        spread = values.std() if values.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        if float(spread) > 0:
            raw[scored] = torch.sigmoid((values - threshold) / (temperature * spread))
        else:
            raw[scored] = (values >= threshold).double()
    elif rule == "rank":
        dropped = math.floor(fraction * values.numel())
        if dropped > 0:
            order = torch.argsort(values, stable=True)
            kept = torch.ones_like(values)
            kept[order[:dropped]] = 0.0
            raw[scored] = kept
    elif rule == "mixture":
        raw[scored] = _mixture_posterior(values, separation)
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return raw


def _mixture_posterior(values: Tensor, separation: float, iterations: int = 100) -> Tensor:
    """Posterior of the higher-mean component of a 1-D two-Gaussian mixture fitted by EM;
    ones when Ashman's ``D = sqrt(2) |mu1 - mu2| / sqrt(s1^2 + s2^2)`` is below
    ``separation`` (no clear second mode to down-weight)."""
    if values.numel() < 4 or float(values.std()) == 0:
        return torch.ones_like(values)
    low, high = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype))
    means = torch.stack([low, high])
    floor = 1e-6 * float(values.var()) + 1e-300
    variances = torch.full((2,), float(values.var()) / 4, dtype=values.dtype)
    priors = torch.full((2,), 0.5, dtype=values.dtype)
    for _ in range(iterations):
        log_density = (
            -0.5 * (values[:, None] - means) ** 2 / variances
            - 0.5 * torch.log(2 * math.pi * variances)
            + torch.log(priors)
        )
        resp = torch.softmax(log_density, dim=1)
        mass = resp.sum(0).clamp_min(1e-12)
        priors = mass / values.numel()
        means = (resp * values[:, None]).sum(0) / mass
        variances = ((resp * (values[:, None] - means) ** 2).sum(0) / mass).clamp_min(floor)
    ashman = math.sqrt(2) * abs(float(means[1] - means[0])) / math.sqrt(float(variances.sum()))
    if ashman < separation:
        return torch.ones_like(values)
    return resp[:, int(torch.argmax(means))]
