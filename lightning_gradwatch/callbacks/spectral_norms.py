"""Layer-wise spectral norms of weights (every logging step) and gradients (on a schedule)."""

from __future__ import annotations

import fnmatch
import math
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .._lightning import current_hook_name, hide_step_values
from ..functional.spectral import (
    as_matrix,
    compute_dtype,
    conv_operator_norm_fft,
    gradient_spectrum,
    init_power_iteration_vectors,
    log_lipschitz_upper_bound,
    power_iteration,
    stable_rank,
)
from ..heatmap import heatmap_image, matplotlib_available
from ..loggers import (
    add_custom_scalars,
    is_logging_step,
    log_image,
    log_scalars_batch,
    tensorboard_writer,
    warn_if_no_logger,
)
from ..probe.rules.parametrized import effective_tensor, reparametrized_tensors
from ._strategies import refuse_sharded_strategy

#: Module types whose matrix-shaped parameters are tracked when neither ``params`` nor
#: ``module_types`` is given. ``_ConvNd`` covers ConvNd and ConvTransposeNd;
#: ``MultiheadAttention`` contributes ``in_proj_weight`` (or ``q/k/v_proj_weight``), its output
#: projection is a ``Linear``.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.MultiheadAttention,
)

PREFIX = "spectral"
#: The heatmap images may take at most about 1/_HEATMAP_TIME_RATIO of the training time: after
#: a rendering that took t seconds, epoch ends in the next _HEATMAP_TIME_RATIO * t seconds write
#: no images (rendering with matplotlib costs about 0.1 s per image; the end of training always
#: writes the latest columns).
_HEATMAP_TIME_RATIO = 20.0
#: Model-level keys, logged through ``pl_module.log``; per-layer keys go in one batch.
_SUMMARY_PREFIXES = (f"{PREFIX}/summary/", f"{PREFIX}/growth_alarm")


@dataclass
class _Tracked:
    name: str
    param: nn.Parameter
    module: nn.Module
    output_dim: int  # 1 for ConvTransposeNd, whose weight is (in, out/groups, *kernel)
    #: For a reparametrized weight (``name`` is then the module's attribute, e.g.
    #: ``fc.weight``, and ``param`` its first trainable source): the attribute's name in
    #: ``module``, read with :func:`effective_tensor`.
    effective: str | None = None

    def weight(self) -> Tensor:
        if self.effective is not None:
            return effective_tensor(self.module, self.effective)
        return self.param.detach()

    def matrix(self) -> Tensor:
        weight = self.weight()
        return as_matrix(weight.to(compute_dtype(weight.dtype)), self.output_dim)


class SpectralNorms(Callback):
    """Per-layer spectral norms of the weights and, on a schedule, spectra of the gradients.

    **Weights**, on every logging step (``trainer.log_every_n_steps``) after the optimizer step:
    ``sigma_max`` by power iteration warm-started from the previous call's singular vectors
    (``power_iterations`` per call), and ``stable_rank = |W|_F^2 / sigma_max^2``. Weights of
    rank > 2 are read as ``out x rest`` matrices (see
    :func:`lightning_gradwatch.functional.spectral.as_matrix`). Every ``exact_every_n_steps``
    steps (default: at each epoch's end) the estimate is compared with the exact
    ``torch.linalg.matrix_norm(W, ord=2)``; the relative error is logged, and a layer whose
    error exceeds ``exact_rtol`` is refined on the spot and gets twice the iterations per call
    from then on.

    **Gradients**, every ``grad_every_n_steps`` optimizer steps (at the first logging step at or
    after each multiple): a full SVD of each layer's batch gradient matrix, read in
    ``on_before_optimizer_step``, i.e. after AMP unscaling, after DDP's all-reduce and after
    gradient accumulation, before gradient clipping. Logged: ``grad_sigma_max``,
    ``grad_nuclear_norm`` and ``grad_effective_rank`` (Roy & Vetterli).

    The singular vectors are the callback's own buffers on each weight's device, updated
    without autograd; parameters and ``.grad`` are only read, so training is unchanged. They
    are saved in the callback's ``state_dict``, so a resumed run continues warm.

    Logged keys (``<p>`` is the parameter name, e.g. ``net.0.weight``):

    - ``spectral/<p>/sigma_max``, ``spectral/<p>/stable_rank``
    - ``spectral/<p>/power_iter_rel_err`` (at exact checks)
    - ``spectral/<p>/conv_operator_norm`` (at exact checks, ``conv_operator_norm=True``)
    - ``spectral/<p>/grad_sigma_max``, ``spectral/<p>/grad_nuclear_norm``,
      ``spectral/<p>/grad_effective_rank``
    - ``spectral/summary/max_sigma_max``, ``spectral/summary/mean_sigma_max``,
      ``spectral/summary/log_lipschitz_upper_bound`` (natural log of the product of the
      layers' ``sigma_max``)
    - ``spectral/growth_alarm`` (number of layers whose ``sigma_max`` grew by more than
      ``growth_alarm_factor`` within ``growth_alarm_window`` steps; only when the alarm is on)

    At epoch ends two layers x steps heatmaps go to TensorBoard as images (with matplotlib:
    labelled axes and a colour bar); an epoch end soon after the last rendering skips them, so
    they take at most about 5% of the training time, and the end of training writes the latest.

    Args:
        params: ``fnmatch`` patterns of parameter names to track (e.g. ``["encoder.*"]``);
            each must match at least one parameter with 2 or more dimensions.
        module_types: track the matrix-shaped parameters owned by modules of these types.
            Default (when ``params`` is also ``None``): :data:`DEFAULT_MODULE_TYPES`. When both
            are given, a parameter must satisfy both.
        power_iterations: power-iteration steps per logging step (>= 1).
        exact_every_n_steps: optimizer steps between exact checks; ``None``: once per epoch,
            at its end.
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
        grad_every_n_steps: int | None = 50,
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
            f"exact_every_n_steps must be a positive int or None (once per epoch), "
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

        self._tracked: list[_Tracked] = []
        self._generator = torch.Generator().manual_seed(seed)
        self._u: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}
        self._iterations: dict[str, int] = {}
        self._last_sigma: dict[str, Tensor] = {}
        self._last_read_step = -1
        self._next_grad_step = 0
        self._next_exact_step = exact_every_n_steps or 0
        self._history_names: list[str] = []
        self._history_steps: list[int] = []
        self._history: list[Tensor] = []
        self._recent: deque[tuple[int, Tensor]] = deque()
        self._last_heatmap_step: int | None = None  # newest column in the last heatmap images
        self._heatmap_due = 0.0  # time.perf_counter() before which epoch ends skip the heatmaps
        self._alarmed: set[str] = set()
        self._unconverged_warned: set[str] = set()
        self._conv_grid: dict[str, tuple[int, ...]] = {}
        self._hooks: list[Any] = []
        self._step_keys: list[str] = []  # Lightning result keys logged on_step this batch
        self._optimizer_stepped = False  # set in on_before_optimizer_step, read at batch end
        #: Logged-step values of the last weight read, exact check and gradient read, by key.
        self.last_values: dict[str, float] = {}
        #: Gradient reads skipped because a gradient was not finite (e.g. AMP overflow).
        self.skipped_grad_steps = 0
        #: Layer weight reads skipped because the weight was not finite.
        self.skipped_weight_reads = 0

    # -- setup -----------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # Two instances tracking different weights keep separate checkpoint entries.
        types = None if self.module_types is None else [t.__name__ for t in self.module_types]
        return self._generate_state_key(params=self.params, module_types=types)

    @property
    def tracked_names(self) -> list[str]:
        """Names of the tracked parameters, in model order (the heatmaps' rows)."""
        return [t.name for t in self._tracked]

    def _select(self, pl_module: pl.LightningModule) -> list[_Tracked]:
        owners: dict[int, nn.Module] = {}
        for module in pl_module.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), module)
        module_types = self.module_types
        if module_types is None and self.params is None:
            module_types = DEFAULT_MODULE_TYPES
        named = list(pl_module.named_parameters())
        if self.params is not None:
            # A reparametrized weight is matched by its attribute name (``fc.weight``) too.
            effective = [
                (n, effective_tensor(m, a))
                for n, (m, a) in _reparametrized_modules(pl_module).items()
            ]
            for pattern in self.params:
                hits = [(n, p) for n, p in named + effective if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise ValueError(
                        f"SpectralNorms: params pattern {pattern!r} matches no parameter. "
                        f"Parameter names look like {[n for n, _ in named[:5]]}"
                    )
                if all(p.dim() < 2 for _, p in hits):
                    raise ValueError(
                        f"SpectralNorms: params pattern {pattern!r} matches only vectors "
                        f"({[n for n, _ in hits[:5]]}); spectral norms need weights with 2 or "
                        f"more dimensions, so name weight matrices (e.g. '*.weight')"
                    )
        tracked = self._select_reparametrized(pl_module, module_types)
        sources = {id(p) for t in tracked for p in t.module.parameters()}
        for name, p in named:
            if p.dim() < 2 or id(p) in sources:
                continue
            if self.params is not None and not any(
                fnmatch.fnmatchcase(name, pat) for pat in self.params
            ):
                continue
            module = owners[id(p)]
            if module_types is not None and not isinstance(module, module_types):
                continue
            transposed = isinstance(module, nn.modules.conv._ConvNd) and module.transposed
            tracked.append(_Tracked(name, p, module, output_dim=1 if transposed else 0))
        if not tracked:
            raise ValueError(
                f"SpectralNorms: no weight to track (params={self.params}, module_types="
                f"{module_types}). Pass params=[...] with parameter-name patterns or "
                f"module_types=(...) matching modules that hold weight matrices"
            )
        return tracked

    def _select_reparametrized(
        self, pl_module: pl.LightningModule, module_types: tuple[type[nn.Module], ...] | None
    ) -> list[_Tracked]:
        """Reparametrized weights (``parametrize``, legacy weight/spectral-norm hooks) of
        matching modules, tracked as the effective weight the layer uses, under the module's
        attribute name (``fc.weight``). Their gradient spectra are not computed: the effective
        weight is not a leaf and has no ``.grad``."""
        params = dict(pl_module.named_parameters())
        tracked = []
        for name, (_how, source_names) in reparametrized_tensors(pl_module).items():
            module_name, _, attribute = name.rpartition(".")
            module = pl_module.get_submodule(module_name)
            if not source_names or (
                module_types is not None and not isinstance(module, module_types)
            ):
                continue
            if self.params is not None and not any(
                fnmatch.fnmatchcase(name, pat) for pat in self.params
            ):
                continue
            if effective_tensor(module, attribute).dim() < 2:
                continue
            transposed = isinstance(module, nn.modules.conv._ConvNd) and module.transposed
            tracked.append(
                _Tracked(
                    name,
                    params[source_names[0]],
                    module,
                    output_dim=1 if transposed else 0,
                    effective=attribute,
                )
            )
        return tracked

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer.strategy, type(self).__name__)
        self._tracked = self._select(pl_module)
        for t in self._tracked:
            rows, cols = t.matrix().shape
            u = self._u.get(t.name)
            if u is None or u.shape != (rows,) or self._v[t.name].shape != (cols,):
                self._reinit(t)
            self._iterations.setdefault(t.name, self.power_iterations)
        if self._history_names and self._history_names != self.tracked_names:
            self._history, self._history_steps = [], []  # a different model: start over
            self._recent.clear()
        self._history_names = self.tracked_names
        if self.conv_operator_norm:
            for t in self._tracked:
                if isinstance(t.module, nn.modules.conv._ConvNd) and not t.module.transposed:
                    self._hooks.append(
                        t.module.register_forward_pre_hook(self._grid_recorder(t.name, t.module))
                    )
        warn_if_no_logger(trainer, type(self).__name__)

    def _grid_recorder(self, name: str, conv: nn.Module) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in self._conv_grid or not args or not isinstance(args[0], Tensor):
                return
            spatial = tuple(args[0].shape[-(module.weight.dim() - 2) :])
            if module.padding_mode == "circular":
                self._conv_grid[name] = spatial
            else:
                # _reversed_padding_repeated_twice lists (left, right) pairs, last dim first.
                pads = module._reversed_padding_repeated_twice
                d = len(spatial)
                self._conv_grid[name] = tuple(
                    n + pads[2 * (d - 1 - i)] + pads[2 * (d - 1 - i) + 1]
                    for i, n in enumerate(spatial)
                )

        return record

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
        charts = {
            "sigma_max": [rf"{PREFIX}/.*/sigma_max$"],
            "stable_rank": [rf"{PREFIX}/.*/stable_rank$"],
            "power_iter_rel_err": [rf"{PREFIX}/.*/power_iter_rel_err$"],
            "summary": [rf"{PREFIX}/summary/.*", rf"{PREFIX}/growth_alarm$"],
        }
        if self.grad_every_n_steps is not None:
            for key in ("grad_sigma_max", "grad_nuclear_norm", "grad_effective_rank"):
                charts[key] = [rf"{PREFIX}/.*/{key}$"]
        if self.conv_operator_norm:
            charts["conv_operator_norm"] = [rf"{PREFIX}/.*/conv_operator_norm$"]
        groups = sorted({_group(n) for n in self.tracked_names})
        if len(groups) > 1:
            for group in groups:
                charts[f"sigma_max · {group}"] = [
                    rf"{PREFIX}/{re.escape(group)}\..*/sigma_max$",
                    rf"{PREFIX}/{re.escape(group)}/sigma_max$",
                ]
        add_custom_scalars(trainer, "spectral norms", charts)
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero and self.heatmap:
            rows = "\n".join(f"{i}. `{n}`" for i, n in enumerate(self.tracked_names))
            writer.add_text(f"{PREFIX}/heatmap/rows", rows, global_step=trainer.global_step)

    # -- vectors -----------------------------------------------------------------------
    def _reinit(self, t: _Tracked) -> None:
        rows, cols = t.matrix().shape
        dtype = compute_dtype(t.param.dtype)
        self._u[t.name], self._v[t.name] = init_power_iteration_vectors(
            rows, cols, generator=self._generator, device=t.param.device, dtype=dtype
        )

    def _vectors(self, t: _Tracked, matrix: Tensor) -> tuple[Tensor, Tensor]:
        u, v = self._u[t.name], self._v[t.name]
        if u.device != matrix.device or u.dtype != matrix.dtype:
            u, v = u.to(matrix.device, matrix.dtype), v.to(matrix.device, matrix.dtype)
        return u, v

    def _iterate(self, t: _Tracked, matrix: Tensor, n: int) -> Tensor:
        u, v = self._vectors(t, matrix)
        sigma, self._u[t.name], self._v[t.name] = power_iteration(matrix, u, v, n)
        return sigma

    # -- schedule ------------------------------------------------------------------------
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
        self._read_weights(trainer, pl_module, step)
        if self.exact_every_n_steps is not None and step >= self._next_exact_step:
            self._exact_check(pl_module, on_epoch=False)
            self._next_exact_step = (step // self.exact_every_n_steps + 1) * (
                self.exact_every_n_steps
            )

    def _read_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        with torch.no_grad():
            sigmas, fro_sq = [], []
            for t in self._tracked:
                matrix = t.matrix()
                sigma = self._iterate(t, matrix, self._iterations[t.name])
                self._last_sigma[t.name] = sigma
                sigmas.append(sigma)
                fro_sq.append(torch.linalg.vector_norm(matrix).square())
            values = _to_cpu([torch.stack([s, f]) for s, f in zip(sigmas, fro_sq, strict=True)])
        self._last_read_step = step
        logged: dict[str, float] = {}
        finite_sigmas = []
        column = torch.full((len(self._tracked),), math.nan)
        for i, (t, pair) in enumerate(zip(self._tracked, values, strict=True)):
            sigma, fro = pair[0], pair[1]
            if not (torch.isfinite(sigma) and torch.isfinite(fro)):
                self.skipped_weight_reads += 1
                self._reinit(t)  # a NaN weight poisons the vectors; start over when it recovers
                continue
            if sigma == 0:
                self._reinit(t)  # u collapsed to 0 and would stay there
            logged[f"{PREFIX}/{t.name}/sigma_max"] = float(sigma)
            logged[f"{PREFIX}/{t.name}/stable_rank"] = float(stable_rank(fro, sigma))
            finite_sigmas.append(sigma)
            column[i] = float(sigma)
        if finite_sigmas:
            s = torch.stack(finite_sigmas).double()
            logged[f"{PREFIX}/summary/max_sigma_max"] = float(s.max())
            logged[f"{PREFIX}/summary/mean_sigma_max"] = float(s.mean())
            logged[f"{PREFIX}/summary/log_lipschitz_upper_bound"] = float(
                log_lipschitz_upper_bound(s)
            )
        if self.growth_alarm_factor is not None:
            logged[f"{PREFIX}/growth_alarm"] = float(self._check_growth(step, column))
        self._record_history(step, column)
        self._log(pl_module, logged, on_epoch=False)

    def _record_history(self, step: int, column: Tensor) -> None:
        if not self.heatmap:
            return
        self._history_steps.append(step)
        self._history.append(column)
        if len(self._history) > 2 * self.heatmap_max_columns:
            # Thin the older half 2:1, keeping the most recent columns at full resolution.
            half = len(self._history) // 2
            keep = list(range(0, half, 2)) + list(range(half, len(self._history)))
            self._history = [self._history[i] for i in keep]
            self._history_steps = [self._history_steps[i] for i in keep]

    def _check_growth(self, step: int, column: Tensor) -> int:
        """Layers whose sigma_max exceeds ``factor`` times their minimum over the window."""
        assert self.growth_alarm_factor is not None
        while self._recent and self._recent[0][0] < step - self.growth_alarm_window:
            self._recent.popleft()
        alarmed: set[str] = set()
        if self._recent:
            past = torch.stack([c for _, c in self._recent])
            past = torch.where(past > 0, past, torch.full_like(past, math.inf))  # NaN/0 ignored
            floor = past.nan_to_num(nan=math.inf).min(0).values
            ratio = column / floor
            for t, r in zip(self._tracked, ratio.tolist(), strict=True):
                if math.isfinite(r) and r > self.growth_alarm_factor:
                    alarmed.add(t.name)
        for name in sorted(alarmed - self._alarmed):
            rank_zero_warn(
                f"SpectralNorms: sigma_max of {name!r} grew by more than "
                f"{self.growth_alarm_factor}x within {self.growth_alarm_window} steps "
                f"(step {step}). This often precedes a training instability; consider a lower "
                f"learning rate, warm-up, or gradient clipping."
            )
        self._alarmed = alarmed
        self._recent.append((step, column))
        return len(alarmed)

    # -- exact checks -------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.exact_every_n_steps is None:
            self._exact_check(pl_module, on_epoch=True)
        if self.heatmap and self._history:
            self._log_heatmaps(trainer)

    def _exact_check(self, pl_module: pl.LightningModule, on_epoch: bool) -> None:
        """Compare the current estimate with ``matrix_norm(ord=2)``; refine where it is off."""
        step = pl_module.trainer.global_step
        logged: dict[str, float] = {}
        with torch.no_grad():
            for t in self._tracked:
                matrix = t.matrix()
                if not bool(torch.isfinite(matrix).all()):
                    continue
                if self._last_read_step == step and t.name in self._last_sigma:
                    estimate = self._last_sigma[t.name]  # what was logged for these weights
                else:
                    estimate = self._iterate(t, matrix, self._iterations[t.name])
                exact = torch.linalg.matrix_norm(matrix, ord=2)
                rel_err = _rel_err(estimate, exact)
                logged[f"{PREFIX}/{t.name}/power_iter_rel_err"] = rel_err
                if rel_err > self.exact_rtol:
                    self._refine(t, matrix, exact)
                if self.conv_operator_norm and t.name in self._conv_grid:
                    conv = t.module
                    logged[f"{PREFIX}/{t.name}/conv_operator_norm"] = float(
                        conv_operator_norm_fft(
                            t.weight(),
                            self._conv_grid[t.name],
                            groups=conv.groups,
                            dilation=conv.dilation,
                        )
                    )
        self._log(pl_module, logged, on_epoch=on_epoch)

    def _refine(self, t: _Tracked, matrix: Tensor, exact: Tensor) -> None:
        """Extra iterations until the estimate is within ``exact_rtol``, and more per call."""
        self._iterations[t.name] = min(2 * self._iterations[t.name], self.max_power_iterations)
        spent, rel_err = 0, math.inf
        while spent < self.max_refine_iterations:
            chunk = min(8, self.max_refine_iterations - spent)
            rel_err = _rel_err(self._iterate(t, matrix, chunk), exact)
            spent += chunk
            if rel_err <= self.exact_rtol:
                return
        if t.name not in self._unconverged_warned:
            self._unconverged_warned.add(t.name)
            rank_zero_warn(
                f"SpectralNorms: power iteration for {t.name!r} is still {rel_err:.2e} off the "
                f"exact sigma_max after {spent} extra iterations (its top singular values are "
                f"nearly equal). Its logged sigma_max may be low by up to the logged "
                f"power_iter_rel_err; raise power_iterations or max_refine_iterations."
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
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [
            t
            for t in self._tracked
            if t.effective is None and id(t.param) in in_optimizer and t.param.grad is not None
        ]
        if not layers:
            return
        with torch.no_grad():
            grads = []
            for t in layers:
                grad = t.param.grad.detach()
                if grad.is_sparse:
                    grad = grad.to_dense()
                grads.append(as_matrix(grad.to(compute_dtype(grad.dtype)), t.output_dim))
            finite = _to_cpu([torch.isfinite(g).all() for g in grads])
            if not all(bool(f) for f in finite):
                self.skipped_grad_steps += 1  # e.g. an AMP overflow step, skipped by the scaler
                return
            values = _to_cpu([torch.stack(gradient_spectrum(g)) for g in grads])
        self._next_grad_step = (step // self.grad_every_n_steps + 1) * self.grad_every_n_steps
        logged: dict[str, float] = {}
        for t, (sigma, nuclear, erank) in zip(layers, values, strict=True):
            logged[f"{PREFIX}/{t.name}/grad_sigma_max"] = float(sigma)
            logged[f"{PREFIX}/{t.name}/grad_nuclear_norm"] = float(nuclear)
            logged[f"{PREFIX}/{t.name}/grad_effective_rank"] = float(erank)
        self._log(pl_module, logged, on_epoch=False)

    # -- views -------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.heatmap and self._history:
            self._log_heatmaps(trainer, final=True)  # columns an epoch end skipped

    def _log_heatmaps(self, trainer: pl.Trainer, final: bool = False) -> None:
        if tensorboard_writer(trainer) is None or not trainer.is_global_zero:
            return  # nothing would receive the images: skip the rendering
        if self._history_steps[-1] == self._last_heatmap_step:
            return  # no column since the last images (epochs shorter than log_every_n_steps)
        if not final and time.perf_counter() < self._heatmap_due:
            return  # short epochs: keep the rendering a small fraction of the training time
        started = time.perf_counter()
        self._last_heatmap_step = self._history_steps[-1]
        history = torch.stack(self._history, dim=1).double()  # (layers, steps)
        log_sigma = history.log()
        growth = log_sigma - _first_finite(log_sigma)[:, None]
        step = trainer.global_step
        log_image(
            trainer,
            f"{PREFIX}/heatmap/sigma_max_growth",
            self._render(growth, "sigma_max growth since the first recorded step", diverging=True),
            step,
        )
        log_image(
            trainer,
            f"{PREFIX}/heatmap/log_sigma_max",
            self._render(log_sigma, "log sigma_max (natural log)"),
            step,
        )
        finished = time.perf_counter()
        self._heatmap_due = finished + _HEATMAP_TIME_RATIO * (finished - started)

    def _render(self, values: Tensor, title: str, diverging: bool = False) -> Tensor:
        """``(layers, steps)`` history -> ``(3, H, W)`` image: labelled axes (layer names, steps)
        and a colour bar with matplotlib; without it, the plain :func:`_render` cells (row
        names in the ``spectral/heatmap/rows`` text)."""
        if not matplotlib_available():
            return _render(values, diverging=diverging)
        label = "log(sigma_max / first sigma_max)" if diverging else "log sigma_max"
        return heatmap_image(
            values, self._history_names, self._history_steps, title, label, diverging=diverging
        )

    # -- logging -------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._hide_flushed_step_values(trainer)

    def _hide_flushed_step_values(self, trainer: pl.Trainer) -> None:
        """Stop Lightning from writing our step values again at later logging steps.

        Lightning keeps every ``on_step`` value of the epoch and re-sends its last value to the
        loggers at each logging step, so a gradient spectrum read at step 0 would appear again,
        unchanged, at steps 1, 2, ... of a plot as if it had been measured there. Our values were
        written at the end of the batch that logged them; marking them reset hides them until
        they are logged again (``trainer.callback_metrics`` keeps the last value for
        ``EarlyStopping`` and ``ModelCheckpoint``).
        """
        hide_step_values(trainer, self._step_keys)
        self._step_keys.clear()

    def _log(self, pl_module: pl.LightningModule, values: dict[str, float], on_epoch: bool) -> None:
        self.last_values.update(values)
        if not on_epoch:
            # Per-layer values go to the loggers in one batch (as LearningRateMonitor does):
            # pl_module.log costs about half a millisecond per key, which would dominate the
            # cost of the power iterations. They still reach trainer.callback_metrics.
            per_layer = {k: v for k, v in values.items() if not k.startswith(_SUMMARY_PREFIXES)}
            log_scalars_batch(pl_module.trainer, per_layer)
            values = {k: v for k, v in values.items() if k not in per_layer}
            fx = current_hook_name(pl_module)
            self._step_keys.extend(f"{fx}.{key}" for key in values)
        for key, value in values.items():
            # A float64 CPU tensor: a Python float would be rounded to float32 by Lightning.
            pl_module.log(
                key,
                torch.tensor(value, dtype=torch.float64),
                on_step=not on_epoch,
                on_epoch=on_epoch,
                batch_size=1,
                sync_dist=False,
            )

    # -- state ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "u": {k: v.detach().cpu() for k, v in self._u.items()},
            "v": {k: v.detach().cpu() for k, v in self._v.items()},
            "iterations": dict(self._iterations),
            "generator": self._generator.get_state(),
            "next_grad_step": self._next_grad_step,
            "next_exact_step": self._next_exact_step,
            "history_names": list(self._history_names),
            "history_steps": list(self._history_steps),
            "history": [c.clone() for c in self._history],
            "recent": [(s, c.clone()) for s, c in self._recent],
            "skipped_grad_steps": self.skipped_grad_steps,
            "skipped_weight_reads": self.skipped_weight_reads,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Loaded vectors stay on the CPU until first use, then move to the weight's device.
        self._u = dict(state_dict.get("u", {}))
        self._v = dict(state_dict.get("v", {}))
        self._iterations = dict(state_dict.get("iterations", {}))
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"])
        self._next_grad_step = int(state_dict.get("next_grad_step", 0))
        self._next_exact_step = int(state_dict.get("next_exact_step", self._next_exact_step))
        self._history_names = list(state_dict.get("history_names", []))
        self._history_steps = list(state_dict.get("history_steps", []))
        self._history = list(state_dict.get("history", []))
        self._recent = deque(state_dict.get("recent", []))
        self.skipped_grad_steps = int(state_dict.get("skipped_grad_steps", 0))
        self.skipped_weight_reads = int(state_dict.get("skipped_weight_reads", 0))
        # A checkpoint of another model: re-initialise the vectors whose shapes do not fit.
        for t in self._tracked:
            rows, cols = t.matrix().shape
            u, v = self._u.get(t.name), self._v.get(t.name)
            if u is None or v is None or u.shape != (rows,) or v.shape != (cols,):
                self._reinit(t)
            self._iterations.setdefault(t.name, self.power_iterations)


def _reparametrized_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"fc.weight": (fc, "weight")}`` for every reparametrized tensor of ``model``."""
    modules = dict(model.named_modules())
    found = {}
    for name in reparametrized_tensors(model):
        module_name, _, attribute = name.rpartition(".")
        found[name] = (modules[module_name], attribute)
    return found


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"SpectralNorms: {message}")


def _group(name: str) -> str:
    """The top-level module a parameter belongs to (``encoder.layers.0.w`` -> ``encoder``)."""
    return name.split(".", 1)[0]


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


def _rel_err(estimate: Tensor, exact: Tensor) -> float:
    exact_f = float(exact)
    if exact_f == 0.0:
        return abs(float(estimate))
    return abs(exact_f - float(estimate)) / exact_f


def _first_finite(values: Tensor) -> Tensor:
    """Per row, the first finite entry (NaN if none)."""
    finite = torch.isfinite(values)
    idx = finite.double().argmax(dim=1)
    first = values.gather(1, idx[:, None]).squeeze(1)
    return torch.where(finite.any(dim=1), first, torch.full_like(first, math.nan))


def _render(values: Tensor, diverging: bool = False) -> Tensor:
    """``(layers, steps)`` -> ``(3, H, W)`` image in ``[0, 1]``; NaN cells are grey.

    Diverging: white = no change, red = growth, blue = shrinkage, scaled by the largest
    absolute value. Otherwise a black-red-yellow-white ramp from the minimum to the maximum.
    """
    finite = torch.isfinite(values)
    x = torch.where(finite, values, torch.zeros_like(values))
    if diverging:
        scale = x.abs().max().clamp_min(1e-12)
        x = (x / scale).clamp(-1, 1)
        red = 1 - (-x).clamp_min(0)
        blue = 1 - x.clamp_min(0)
        green = 1 - x.abs()
    else:
        lo = x[finite].min() if finite.any() else x.new_tensor(0.0)
        hi = x[finite].max() if finite.any() else x.new_tensor(1.0)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
        red, green, blue = (3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)
    image = torch.stack([red, green, blue])
    image = torch.where(finite[None], image, torch.full_like(image, 0.5))
    layers, steps = values.shape
    row_px = max(1, 256 // max(layers, 1))
    col_px = max(1, 512 // max(steps, 1))
    image = image.repeat_interleave(row_px, dim=1).repeat_interleave(col_px, dim=2).float()
    if layers > 1 and row_px >= 6:
        image[:, row_px::row_px, :] = 0.75  # a thin grey line between layers
    return image
