"""Every name the callbacks log, in one place: the naming scheme.

TensorBoard groups tags into sections by the text before the first ``/`` (Lightning's loggers
join prefixes with the same ``/``, their default ``group_separator``) and sorts the sections
by name. The scheme uses that:

- **Headline sections** hold model-level values only, a handful each, so they are never
  buried: ``gwa/``, ``gsnr/``, ``noise_scale/``, ``eb/``, ``spectral/``, ``reweight/`` and
  ``gradwatch/`` (bookkeeping, such as skipped steps).
- **Per-layer detail** lives in a sibling section with the suffix ``_layers``, which sorts
  directly after its headline section: ``<family>_layers/<quantity>/<parameter name>``. One
  section holds every layer of a quantity side by side, and never mixes with the headline.
  Where a quantity has many layers, a histogram across the layers (``<family>/<quantity>_layers``)
  summarises it in the headline section, as one chart.
- A name is either a value or a folder, never both.

``docs/index.md`` has the table of every key, what it means and when it is written.
"""

from __future__ import annotations

#: suffix of the per-layer detail section of a family, e.g. ``gsnr_layers/``.
LAYERS_SUFFIX = "_layers"


def layer_key(family: str, quantity: str, param: str) -> str:
    """The per-layer detail key ``<family>_layers/<quantity>/<param>``.

    >>> layer_key("spectral", "sigma_max", "net.0.weight")
    'spectral_layers/sigma_max/net.0.weight'
    """
    return f"{family}{LAYERS_SUFFIX}/{quantity}/{param}"


def layer_pattern(family: str, quantity: str) -> str:
    """Regular expression matching every layer of one per-layer quantity (for Custom Scalars)."""
    return rf"{family}{LAYERS_SUFFIX}/{quantity}/.*"


def layers_histogram_key(family: str, quantity: str) -> str:
    """The headline-section histogram of one per-layer quantity across the layers.

    >>> layers_histogram_key("gsnr", "gsnr")
    'gsnr/gsnr_layers'
    """
    return f"{family}/{quantity}{LAYERS_SUFFIX}"


# -- gradient-weight alignment (GradientWeightAlignment, GWAEarlyStopping) ----------------------
GWA_AGGREGATE = "gwa/aggregate"  #: epoch: mean / (excess kurtosis + 1.2) over the epoch's scores
GWA_MEAN = "gwa/mean"  #: epoch: mean alignment score
GWA_KURTOSIS = "gwa/kurtosis"  #: epoch: excess kurtosis of the scores
GWA_STEP_MEAN = "gwa/step_mean"  #: step: mean score of this rank's batch
GWA_SELECTED_EPOCH = "gwa/selected_epoch"  #: epoch: the epoch GWAEarlyStopping selects so far
GWA_SCORES = "gwa/scores"  #: histogram, epoch: the epoch's per-sample scores
GWA_FAMILY = "gwa"  #: per-layer: ``gwa_layers/aggregate/<param>``

# -- gradient noise (GradientSNR, EBEarlyStopping) ---------------------------------------------
GSNR_MEAN = "gsnr/mean"  #: step: model GSNR, averaged over parameter entries
GSNR_COHERENCE = "gsnr/coherence"  #: step: gradient coherence of the batch
GSNR_FAMILY = "gsnr"  #: per-layer: ``gsnr_layers/gsnr/<param>``, ``gsnr_layers/coherence/<param>``
NOISE_SCALE = "noise_scale/simple"  #: step: the simple noise scale B_simple
NOISE_SCALE_SMOOTHED = "noise_scale/smoothed"  #: step: ratio of EMAs of its two parts
NOISE_TRACE_SIGMA = "noise_scale/trace_sigma"  #: step: tr(Sigma), per-sample covariance trace
NOISE_GRAD_SQ_NORM = "noise_scale/grad_sq_norm"  #: step: unbiased |G|^2 of the true gradient
EB_CRITERION = "eb/criterion"  #: step: the EB criterion of the batch
EB_CRITERION_WINDOW = "eb/criterion_window"  #: step: EBEarlyStopping's window mean

# -- spectral norms (SpectralNorms) -------------------------------------------------------------
SPECTRAL_MAX_SIGMA = "spectral/max_sigma_max"  #: step: largest sigma_max over tracked layers
SPECTRAL_MEAN_SIGMA = "spectral/mean_sigma_max"  #: step: mean sigma_max over tracked layers
SPECTRAL_LOG_LIPSCHITZ = "spectral/log_lipschitz_upper_bound"  #: step: sum of log sigma_max
SPECTRAL_GROWTH_ALARM = "spectral/growth_alarm"  #: step: layers whose sigma_max grew too fast
SPECTRAL_FAMILY = "spectral"  #: per-layer: ``spectral_layers/<quantity>/<param>``
SPECTRAL_HEATMAP_LOG_SIGMA = "spectral/heatmap/log_sigma_max"  #: image: layers x steps
SPECTRAL_HEATMAP_GROWTH = "spectral/heatmap/sigma_max_growth"  #: image: layers x steps
SPECTRAL_HEATMAP_ROWS = "spectral/heatmap/rows"  #: text: the heatmaps' row labels

# -- reweighting (GWAReweighting) ----------------------------------------------------------------
REWEIGHT_RAW_MEAN = "reweight/raw_mean"
REWEIGHT_MIN = "reweight/min"
REWEIGHT_DOWN_WEIGHTED = "reweight/down_weighted"
REWEIGHT_TABLE_DOWN_WEIGHTED = "reweight/table_down_weighted"
REWEIGHT_WEIGHTS = "reweight/weights"  #: histogram

# -- bookkeeping ---------------------------------------------------------------------------------
SKIPPED_STEPS = "gradwatch/skipped_steps"  #: step: optimizer steps skipped (non-finite grads)
BATCH_SIZE = "gradwatch/batch_size"  #: step: samples in the statistics of this step
