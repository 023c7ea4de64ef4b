"""Which Lightning strategies the callbacks can monitor exactly."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch import strategies

#: Strategies that shard parameters (and their gradients) across processes. The names that a
#: Lightning version lacks are skipped.
SHARDED_STRATEGY_NAMES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def sharded_strategy_types() -> tuple[type, ...]:
    """The strategy classes of :data:`SHARDED_STRATEGY_NAMES` this Lightning has."""
    found = (getattr(strategies, name, None) for name in SHARDED_STRATEGY_NAMES)
    return tuple(cls for cls in found if isinstance(cls, type))


def refuse_sharded_strategy(strategy: pl.strategies.Strategy, owner: str) -> None:
    """Raise when ``strategy`` shards the parameters, which the statistics cannot describe.

    Raises:
        ValueError: for FSDP, DeepSpeed and model-parallel strategies (subclasses included),
            naming the strategies to use instead.
    """
    if isinstance(strategy, sharded_strategy_types()):
        raise ValueError(
            f"{owner} cannot monitor a run under {type(strategy).__name__}: it shards the "
            f"parameters and their gradients across processes, so no process holds the full "
            f"weights and per-sample gradients the statistics are defined on, and the numbers "
            f"would describe shards. Monitor the run with strategy='ddp' or 'ddp_spawn' (or on "
            f"a single device), or remove {owner} from the callbacks of the sharded run."
        )
