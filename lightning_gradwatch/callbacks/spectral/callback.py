"""``SpectralNorms``: layer-wise spectral norms of weights (every logging step) and gradients
(on a schedule). The pieces live beside it: weight selection (``selection``), the power
iteration (``power``), gradient spectra (``gradient_svd``), the growth alarm (``growth``) and
the heatmap history (``history``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ... import keys
from ..._lightning import batches_that_stepped, current_hook_name, hide_step_values
from ...functional.spectral import conv_operator_norm_fft, log_lipschitz_upper_bound, stable_rank
from ...loggers import (
    add_custom_scalars,
    is_logging_step,
    log_headline_step,
    log_histogram,
    log_scalars_batch,
    warn_if_no_logger,
)
from .._strategies import refuse_sharded_strategy
from .gradient_svd import GRADIENT_QUANTITIES, gradient_spectra, layers_with_gradients
from .growth import GrowthAlarm
from .history import SigmaHistory
from .power import PowerIterations, exact_sigma_max, rel_err
from .selection import DEFAULT_MODULE_TYPES, TrackedWeight, conv_grid_recorder, select_weights

FAMILY = keys.SPECTRAL_FAMILY
#: Default exact schedule, per layer: a check at the layer's first weight read, then after this
#: many optimizer steps, twice as many after each passing check (up to
#: :data:`MAX_EXACT_INTERVAL_STEPS`), back to this many after a failing one. A check costs a Gram
#: product and a symmetric eigendecomposition, about as much as a few training steps of the
#: layer, so counting in steps (not epochs, which range from tens to thousands of steps) keeps
#: its share of training small whatever the dataset size.
EXACT_INTERVAL_STEPS = 500
#: The longest interval the default schedule backs off to.
MAX_EXACT_INTERVAL_STEPS = 4000


def layer_key(quantity: str, name: str) -> str:
    """``spectral_layers/<quantity>/<name>``."""
    return keys.layer_key(FAMILY, quantity, name)


class SpectralNorms(Callback):
    """Per-layer spectral norms of the weights and, on a schedule, spectra of the gradients.

    **Weights**, on every logging step (``trainer.log_every_n_steps``) after the optimizer step:
    ``sigma_max`` by power iteration warm-started from the previous call's singular vectors
    (``power_iterations`` per call), and ``stable_rank = |W|_F^2 / sigma_max^2``. Weights of
    rank > 2 are read as ``out x rest`` matrices (see
    :func:`lightning_gradwatch.functional.spectral.as_matrix`).

    **Exact checks.** The estimate is compared with the exact ``sigma_max`` (the top eigenvalue
    of the smaller Gram matrix in float64, which equals ``matrix_norm(W, ord=2)`` to float64
    rounding); the relative error is logged, and a layer whose error exceeds ``exact_rtol`` is
    refined on the spot and gets twice the iterations per call from then on. Checks run at
    logging steps, on the estimate logged there. With ``exact_every_n_steps`` every layer is
    checked on that schedule. By default each layer is checked at its first read (its random
    start vectors are first refined to ``exact_rtol``, so the first logged value is converged
    too) and then backs off: the next check is :data:`EXACT_INTERVAL_STEPS` optimizer steps
    later, twice as many after each passing check (at most
    :data:`MAX_EXACT_INTERVAL_STEPS`), and back to :data:`EXACT_INTERVAL_STEPS` after a failing
    one, so a well-converged layer costs one exact check per 4000 steps.

    **Gradients**, every ``grad_every_n_steps`` optimizer steps (at the first logging step at or
    after each multiple): a full SVD of each layer's batch gradient matrix, read in
    ``on_before_optimizer_step``, i.e. after AMP unscaling, after DDP's all-reduce and after
    gradient accumulation, before gradient clipping. Logged: ``grad_sigma_max``,
    ``grad_nuclear_norm`` and ``grad_effective_rank`` (Roy & Vetterli). The SVD costs about as
    much as 2 to 3 training steps of the layer, so the default reads every 500 steps.

    The singular vectors are the callback's own buffers on each weight's device, updated
    without autograd; parameters and ``.grad`` are only read, so training is unchanged. They
    are saved in the callback's ``state_dict``, so a resumed run continues warm. Nothing is
    read on the host on steps that are not logging steps.

    Logged keys (``<p>`` is the parameter name, e.g. ``net.0.weight``):

    - headline, through ``pl_module.log``: ``spectral/max_sigma_max``,
      ``spectral/mean_sigma_max``, ``spectral/log_lipschitz_upper_bound`` (natural log of the
      product of the layers' ``sigma_max``), ``spectral/growth_alarm`` (number of layers whose
      ``sigma_max`` grew by more than ``growth_alarm_factor`` within ``growth_alarm_window``
      steps; only when the alarm is on);
    - per layer, in one batch: ``spectral_layers/sigma_max/<p>``,
      ``spectral_layers/stable_rank/<p>``, ``spectral_layers/power_iter_rel_err/<p>`` (at exact
      checks), ``spectral_layers/conv_operator_norm/<p>`` (at exact checks,
      ``conv_operator_norm=True``), ``spectral_layers/grad_sigma_max/<p>``,
      ``spectral_layers/grad_nuclear_norm/<p>``, ``spectral_layers/grad_effective_rank/<p>``;
    - TensorBoard histograms across layers: ``spectral/sigma_max_layers`` and
      ``spectral/stable_rank_layers`` (with two or more layers).

    At epoch ends two layers x steps heatmaps go to TensorBoard as images (with matplotlib:
    labelled axes and a colour bar), as long as rendering them has taken at most 0.5% of the time
    since the fit started (an epoch end that would exceed it skips them); the end of training
    always writes the latest.

    Args:
        params: ``fnmatch`` patterns of parameter names to track (e.g. ``["encoder.*"]``);
            each must match at least one parameter with 2 or more dimensions.
        module_types: track the matrix-shaped parameters owned by modules of these types.
            Default (when ``params`` is also ``None``): :data:`DEFAULT_MODULE_TYPES`. When both
            are given, a parameter must satisfy both.
        power_iterations: power-iteration steps per logging step (>= 1).
        exact_every_n_steps: optimizer steps between exact checks of every layer; ``None``:
            each layer at its first read, then backing off per layer (see above).
        exact_rtol: relative error above which a layer is refined and its iterations doubled.
        max_refine_iterations: cap on the extra iterations one exact check may spend per layer.
        max_power_iterations: cap on a layer's per-call iterations after doubling.
        grad_every_n_steps: optimizer steps between gradient spectra; ``None`` disables them.
        conv_operator_norm: also compute, at exact checks, the FFT operator norm of each
            (non-transposed) conv layer on its first seen input size (Sedghi et al. 2019).
        heatmap: log the layers x steps images at epoch ends and at the end of training.
        heatmap_max_columns: history kept for the heatmap; older columns are thinned 2:1.
        growth_alarm_factor: warn and flag when ``sigma_max`` grows by more than this factor
            within ``growth_alarm_window`` optimizer steps; ``None`` (default) disables it.
        growth_alarm_window: the alarm's window, in optimizer steps.
        seed: seed of the callback's own generator for the starting vectors (the global RNG is
            never touched).

    Example::

        import lightning.pytorch as pl
        import torch
        from torch import nn
        from lightning_gradwatch import SpectralNorms

        class Model(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        trainer = pl.Trainer(
            max_epochs=2,
            log_every_n_steps=1,
            callbacks=[SpectralNorms(grad_every_n_steps=4, growth_alarm_factor=2.0)],
        )
        trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=16))
    """

    def __init__(
        self,
        params: Sequence[str] | None = None,
        module_types: Sequence[type[nn.Module]] | None = None,
        power_iterations: int = 2,
        exact_every_n_steps: int | None = None,
        exact_rtol: float = 1e-3,
        max_refine_iterations: int = 500,
        max_power_iterations: int = 32,
        grad_every_n_steps: int | None = 500,
        conv_operator_norm: bool = False,
        heatmap: bool = True,
        heatmap_max_columns: int = 512,
        growth_alarm_factor: float | None = None,
        growth_alarm_window: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(params, str):
            params = [params]
        _require(power_iterations >= 1, f"power_iterations must be >= 1, got {power_iterations}")
        _require(
            max_power_iterations >= power_iterations,
            f"max_power_iterations ({max_power_iterations}) must be >= power_iterations "
            f"({power_iterations})",
        )
        _require(
            exact_every_n_steps is None or exact_every_n_steps >= 1,
            f"exact_every_n_steps must be a positive int or None (the default back-off), "
            f"got {exact_every_n_steps}",
        )
        _require(exact_rtol > 0, f"exact_rtol must be > 0, got {exact_rtol}")
        _require(
            max_refine_iterations >= 0,
            f"max_refine_iterations must be >= 0, got {max_refine_iterations}",
        )
        _require(
            grad_every_n_steps is None or grad_every_n_steps >= 1,
            f"grad_every_n_steps must be a positive int or None (off), got {grad_every_n_steps}",
        )
        _require(
            heatmap_max_columns >= 2, f"heatmap_max_columns must be >= 2, got {heatmap_max_columns}"
        )
        _require(
            growth_alarm_factor is None or growth_alarm_factor > 1,
            f"growth_alarm_factor must be > 1 (a growth factor) or None, got {growth_alarm_factor}",
        )
        _require(
            growth_alarm_window >= 1, f"growth_alarm_window must be >= 1, got {growth_alarm_window}"
        )
        self.params = list(params) if params is not None else None
        self.module_types = tuple(module_types) if module_types is not None else None
        self.power_iterations = power_iterations
        self.exact_every_n_steps = exact_every_n_steps
        self.exact_rtol = exact_rtol
        self.max_refine_iterations = max_refine_iterations
        self.max_power_iterations = max_power_iterations
        self.grad_every_n_steps = grad_every_n_steps
        self.conv_operator_norm = conv_operator_norm
        self.heatmap = heatmap
        self.heatmap_max_columns = heatmap_max_columns
        self.growth_alarm_factor = growth_alarm_factor
        self.growth_alarm_window = growth_alarm_window
        self.seed = seed

        self._tracked: list[TrackedWeight] = []
        #: The power iteration's vectors and per-layer iteration counts.
        self.vectors = PowerIterations(
            power_iterations, max_power_iterations, exact_rtol, max_refine_iterations, seed
        )
        #: The ``sigma_max`` history behind the heatmaps.
        self.history = SigmaHistory(heatmap_max_columns)
        self.growth_alarm = (
            GrowthAlarm(growth_alarm_factor, growth_alarm_window)
            if growth_alarm_factor is not None
            else None
        )
        self._last_sigma: dict[str, Tensor] = {}
        self._last_read_step = -1
        self._next_grad_step = 0
        self._next_exact_step = exact_every_n_steps or 0
        #: Default exact schedule, per layer: optimizer steps between checks and the next step
        #: due (a layer not listed is due at its next read).
        self._exact_interval: dict[str, int] = {}
        self._next_exact_due: dict[str, int] = {}
        self._unconverged_warned: set[str] = set()
        self._conv_grid: dict[str, tuple[int, ...]] = {}
        self._hooks: list[Any] = []
        self._step_keys: list[str] = []  # Lightning result keys logged on_step this batch
        self._optimizer_stepped = False  # set in on_before_optimizer_step, read at batch end
        #: Logged values of the last weight read, exact check and gradient read, by key.
        self.last_values: dict[str, float] = {}
        #: Gradient reads skipped because a gradient was not finite (e.g. AMP overflow).
        self.skipped_grad_steps = 0
        #: Layer weight reads skipped because the weight was not finite.
        self.skipped_weight_reads = 0

    # -- setup -----------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # Two instances tracking different weights keep separate checkpoint entries. Lightning
        # reads it around every hook call (profiler labels): built once per value of the
        # settings it depends on (a tuple, compared by identity, and a list, by value).
        params, module_types = self.params, self.module_types
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] is not module_types or cached[1] != params:
            types = None if module_types is None else [t.__name__ for t in module_types]
            key = self._generate_state_key(params=params, module_types=types)
            copy = None if params is None else list(params)
            cached = self._state_key_cache = (module_types, copy, key)
        return cached[2]

    @property
    def tracked_names(self) -> list[str]:
        """Names of the tracked parameters, in model order (the heatmaps' rows)."""
        return [t.name for t in self._tracked]

    def _select(self, pl_module: nn.Module) -> list[TrackedWeight]:
        return select_weights(pl_module, self.params, self.module_types)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer.strategy, type(self).__name__)
        self._tracked = self._select(pl_module)
        for t in self._tracked:
            self.vectors.ensure(t)
        changed = bool(self.history.names) and self.history.names != self.tracked_names
        if changed and self.growth_alarm is not None:
            # A different model: the recorded columns and the alarm's window start over.
            self.growth_alarm.recent.clear()
        self.history.reset_for(self.tracked_names)
        if self.conv_operator_norm:
            for t in self._tracked:
                if isinstance(t.module, nn.modules.conv._ConvNd) and not t.module.transposed:
                    hook = conv_grid_recorder(self._conv_grid, t.name)
                    self._hooks.append(t.module.register_forward_pre_hook(hook))
        warn_if_no_logger(trainer, type(self).__name__)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantities = ["sigma_max", "stable_rank", "power_iter_rel_err"]
        if self.grad_every_n_steps is not None:
            quantities += list(GRADIENT_QUANTITIES)
        if self.conv_operator_norm:
            quantities.append("conv_operator_norm")
        charts = {q: [keys.layer_pattern(FAMILY, q)] for q in quantities}
        charts["summary"] = [
            re.escape(k) + "$"
            for k in (
                keys.SPECTRAL_MAX_SIGMA,
                keys.SPECTRAL_MEAN_SIGMA,
                keys.SPECTRAL_LOG_LIPSCHITZ,
                keys.SPECTRAL_GROWTH_ALARM,
            )
        ]
        groups = sorted({n.split(".", 1)[0] for n in self.tracked_names})
        if len(groups) > 1:
            # One chart per top-level module (``encoder.layers.0.w`` -> ``encoder``).
            for group in groups:
                prefix = re.escape(layer_key("sigma_max", group))
                charts[f"sigma_max · {group}"] = [rf"{prefix}(\..*)?$"]
        add_custom_scalars(trainer, "spectral norms", charts)
        if self.heatmap:
            self.history.start_clock()
            self.history.log_row_names(trainer)

    # -- power iteration -------------------------------------------------------------------
    def _iterate(self, t: TrackedWeight, matrix: Tensor, n: int) -> Tensor:
        """``n`` warm-started power iterations on ``t``'s matrix; the ``()`` estimate."""
        return self.vectors.iterate(t, matrix, n)

    # -- weights ---------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        stepped, self._optimizer_stepped = self._optimizer_stepped, False
        step = trainer.global_step
        if not stepped or step == self._last_read_step or not is_logging_step(trainer):
            return  # weights unchanged (an accumulation micro-batch), or a step not logged
        if self.exact_every_n_steps is not None:
            due = self._tracked if step >= self._next_exact_step else []
        else:
            due = [t for t in self._tracked if self._next_exact_due.get(t.name, 0) <= step]
        # Fresh (random) vectors are brought to the exact value before their first estimate is
        # logged, from the exact value the check below computes anyway.
        exact = self._warm_fresh(due)
        self._read_weights(trainer, pl_module, step)
        passed = self._exact_check(trainer, due, exact) if due else {}
        if self.exact_every_n_steps is not None:
            if due:
                self._next_exact_step = (step // self.exact_every_n_steps + 1) * (
                    self.exact_every_n_steps
                )
            return
        for t in due:
            last = self._exact_interval.get(t.name)
            if passed[t.name] and last is not None:
                interval = min(2 * last, MAX_EXACT_INTERVAL_STEPS)
            else:
                interval = EXACT_INTERVAL_STEPS
            self._exact_interval[t.name] = interval
            self._next_exact_due[t.name] = step + interval
        for name in self.vectors.fresh:
            # Vectors restarted at this read (a non-finite or zero weight): due, and warmed
            # first, at the next read.
            self._next_exact_due.pop(name, None)
            self._exact_interval.pop(name, None)

    def _warm_fresh(self, due: list[TrackedWeight]) -> dict[str, float]:
        """Refine the still-random vectors of the layers due for a check to ``exact_rtol``;
        returns the exact values computed for them, by name, for the check to reuse."""
        exact: dict[str, float] = {}
        with torch.no_grad():
            for t in due:
                if t.name not in self.vectors.fresh:
                    continue
                matrix = t.matrix()
                if not bool(torch.isfinite(matrix).all()):
                    continue
                exact[t.name] = exact_sigma_max(matrix)
                self._refine(t, matrix, exact[t.name], more=False)
        return exact

    def _read_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        with torch.no_grad():
            pairs = []
            for t in self._tracked:
                matrix = t.matrix()
                sigma = self._iterate(t, matrix, self.vectors.iterations[t.name])
                self._last_sigma[t.name] = sigma
                pairs.append(torch.stack([sigma, torch.linalg.vector_norm(matrix).square()]))
            # One device-to-host transfer per device for every layer's pair.
            values = _to_cpu(pairs)
        self._last_read_step = step
        per_layer: dict[str, float] = {}
        finite_sigmas = []
        stable_ranks = []
        column = torch.full((len(self._tracked),), math.nan)
        for i, (t, pair) in enumerate(zip(self._tracked, values, strict=True)):
            sigma, fro = pair[0], pair[1]
            if not (torch.isfinite(sigma) and torch.isfinite(fro)):
                self.skipped_weight_reads += 1
                self.vectors.reinit(t)  # a NaN weight poisons the vectors; restart on recovery
                continue
            if sigma == 0:
                self.vectors.reinit(t)  # u collapsed to 0 and would stay there
            per_layer[layer_key("sigma_max", t.name)] = float(sigma)
            rank = float(stable_rank(fro, sigma))
            per_layer[layer_key("stable_rank", t.name)] = rank
            finite_sigmas.append(sigma)
            stable_ranks.append(rank)
            column[i] = float(sigma)
        headline: dict[str, float] = {}
        if finite_sigmas:
            s = torch.stack(finite_sigmas).double()
            headline[keys.SPECTRAL_MAX_SIGMA] = float(s.max())
            headline[keys.SPECTRAL_MEAN_SIGMA] = float(s.mean())
            headline[keys.SPECTRAL_LOG_LIPSCHITZ] = float(log_lipschitz_upper_bound(s))
            if len(self._tracked) > 1:
                at = batches_that_stepped(trainer)
                log_histogram(trainer, keys.layers_histogram_key(FAMILY, "sigma_max"), s, at)
                ranks = torch.tensor(stable_ranks, dtype=torch.float64)
                log_histogram(trainer, keys.layers_histogram_key(FAMILY, "stable_rank"), ranks, at)
        if self.growth_alarm is not None:
            alarmed = self.growth_alarm.check(step, column, self.tracked_names)
            headline[keys.SPECTRAL_GROWTH_ALARM] = float(alarmed)
        if self.heatmap:
            self.history.record(step, column)
        self._log_per_layer(trainer, per_layer)
        self._log_headline(pl_module, headline)

    # -- exact checks -------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.heatmap:
            self.history.log_images(trainer)

    def _exact_check(
        self,
        trainer: pl.Trainer,
        layers: list[TrackedWeight],
        known: dict[str, float] | None = None,
    ) -> dict[str, bool]:
        """Compare the current estimate of each layer with the exact ``sigma_max`` (taken from
        ``known`` where given, for the current weights); refine where it is off. Returns, per
        checked layer, whether the estimate was within ``exact_rtol`` (a layer with a
        non-finite weight counts as passed: nothing to check)."""
        known = known or {}
        step = trainer.global_step
        logged: dict[str, float] = {}
        passed: dict[str, bool] = {}
        with torch.no_grad():
            for t in layers:
                matrix = t.matrix()
                passed[t.name] = True
                if not bool(torch.isfinite(matrix).all()):
                    continue
                if self._last_read_step == step and t.name in self._last_sigma:
                    estimate = self._last_sigma[t.name]  # what was logged for these weights
                else:
                    estimate = self._iterate(t, matrix, self.vectors.iterations[t.name])
                exact = known[t.name] if t.name in known else exact_sigma_max(matrix)
                error = rel_err(float(estimate), exact)
                logged[layer_key("power_iter_rel_err", t.name)] = error
                if error > self.exact_rtol:
                    passed[t.name] = False
                    self._refine(t, matrix, exact)
                if self.conv_operator_norm and t.name in self._conv_grid:
                    conv = t.module
                    logged[layer_key("conv_operator_norm", t.name)] = float(
                        conv_operator_norm_fft(
                            t.weight(),
                            self._conv_grid[t.name],
                            groups=conv.groups,
                            dilation=conv.dilation,
                        )
                    )
        self._log_per_layer(trainer, logged)
        return passed

    def _refine(self, t: TrackedWeight, matrix: Tensor, exact: float, more: bool = True) -> None:
        """Extra iterations until the estimate is within ``exact_rtol`` and, with ``more``,
        more per call from now on."""
        error = self.vectors.refine(t, matrix, exact, self._iterate, more=more)
        if error > self.exact_rtol and t.name not in self._unconverged_warned:
            self._unconverged_warned.add(t.name)
            rank_zero_warn(
                f"SpectralNorms: power iteration for {t.name!r} is still {error:.2e} off the "
                f"exact sigma_max after {self.max_refine_iterations} extra iterations (its top "
                f"singular values are nearly equal). Its logged sigma_max may be low by up to "
                f"the logged power_iter_rel_err; raise power_iterations or "
                f"max_refine_iterations."
            )

    # -- gradients ------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._optimizer_stepped = True
        if self.grad_every_n_steps is None:
            return
        step = trainer.global_step
        if step < self._next_grad_step or not is_logging_step(trainer):
            return
        layers = layers_with_gradients(self._tracked, optimizer)
        if not layers:
            return
        spectra = gradient_spectra(layers)
        if spectra is None:
            self.skipped_grad_steps += 1  # e.g. an AMP overflow step, skipped by the scaler
            return
        self._next_grad_step = (step // self.grad_every_n_steps + 1) * self.grad_every_n_steps
        logged: dict[str, float] = {}
        for t, row in zip(layers, spectra.tolist(), strict=True):
            for quantity, value in zip(GRADIENT_QUANTITIES, row, strict=True):
                logged[layer_key(quantity, t.name)] = value
        self._log_per_layer(trainer, logged)

    # -- views -------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.heatmap:
            self.history.log_images(trainer, final=True)  # columns an epoch end skipped

    # -- logging -------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._hide_flushed_step_values(trainer)

    def _hide_flushed_step_values(self, trainer: pl.Trainer) -> None:
        """Stop Lightning from writing our step values again at later logging steps.

        Lightning keeps every ``on_step`` value of the epoch and re-sends its last value to the
        loggers at each logging step, so a value read at step 0 would appear again, unchanged,
        at a later logging step without a read (e.g. a resumed run's first step) as if it had
        been measured there. Our values were written at the end of the batch that logged them;
        marking them reset hides them until they are logged again (``trainer.callback_metrics``
        keeps the last value for ``EarlyStopping`` and ``ModelCheckpoint``).
        """
        hide_step_values(trainer, self._step_keys)
        self._step_keys.clear()

    def _log_per_layer(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        """Per-layer values: one batch to every logger (``pl_module.log`` costs about half a
        millisecond per key, which would dominate the power iterations), mirrored into
        ``trainer.callback_metrics``."""
        self.last_values.update(values)
        log_scalars_batch(trainer, values)  # type: ignore[arg-type]

    def _log_headline(self, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        self.last_values.update(values)
        # float64 CPU tensors: a Python float would be rounded to float32 by Lightning.
        log_headline_step(
            pl_module,
            {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()},
            batch_size=1,
        )
        fx = current_hook_name(pl_module)
        self._step_keys.extend(f"{fx}.{key}" for key in values)

    # -- state ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.vectors.state_dict(),
            **self.history.state_dict(),
            "next_grad_step": self._next_grad_step,
            "next_exact_step": self._next_exact_step,
            "exact_interval": dict(self._exact_interval),
            "next_exact_due": dict(self._next_exact_due),
            "recent": list(self.growth_alarm.recent) if self.growth_alarm is not None else [],
            "skipped_grad_steps": self.skipped_grad_steps,
            "skipped_weight_reads": self.skipped_weight_reads,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.vectors.load_state_dict(state_dict)
        self.history.load_state_dict(state_dict)
        self._next_grad_step = int(state_dict.get("next_grad_step", 0))
        self._next_exact_step = int(state_dict.get("next_exact_step", self._next_exact_step))
        if "next_exact_due" in state_dict:
            self._exact_interval = dict(state_dict.get("exact_interval", {}))
            self._next_exact_due = dict(state_dict["next_exact_due"])
        else:
            # A checkpoint of the former epoch-end schedule (its intervals count epochs): check
            # every layer at the next read and start the step schedule from there.
            self._exact_interval, self._next_exact_due = {}, {}
        if self.growth_alarm is not None:
            self.growth_alarm.recent.clear()
            self.growth_alarm.recent.extend(state_dict.get("recent", []))
        self.skipped_grad_steps = int(state_dict.get("skipped_grad_steps", 0))
        self.skipped_weight_reads = int(state_dict.get("skipped_weight_reads", 0))
        # A checkpoint of another model: re-initialise the vectors whose shapes do not fit (due,
        # and warmed first, at their next read).
        for t in self._tracked:
            self.vectors.ensure(t)
        for name in self.vectors.fresh:
            self._next_exact_due.pop(name, None)
            self._exact_interval.pop(name, None)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"SpectralNorms: {message}")


def _to_cpu(tensors: list[Tensor]) -> list[Tensor]:
    """Move to the CPU with one device sync per device instead of one per tensor."""
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(tensors):
        by_device.setdefault(x.device, []).append(i)
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for idx in by_device.values():
        stacked = torch.stack([tensors[i].double() for i in idx]).cpu()
        for j, i in enumerate(idx):
            out[i] = stacked[j]
    return out


__all__ = ["DEFAULT_MODULE_TYPES", "SpectralNorms", "TrackedWeight"]
