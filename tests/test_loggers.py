"""The TensorBoard helpers write what a user sees in TensorBoard."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_gradwatch.loggers import add_custom_scalars


def _layouts(log_dir) -> list[list[str]]:
    """Category titles of every custom-scalars layout written to the run, in order."""
    written = []
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(value.tensor.string_val[0])
                    written.append([c.title for c in layout.category])
    return written


def test_custom_scalar_layouts_of_several_callbacks_are_merged(tmp_path):
    # TensorBoard shows only the last layout written to a run: the last one must hold every
    # category, or the earlier callbacks' charts disappear from the Custom Scalars tab.
    trainer = pl.Trainer(
        logger=TensorBoardLogger(tmp_path), default_root_dir=tmp_path, enable_progress_bar=False
    )
    assert add_custom_scalars(trainer, "gradient-weight alignment", {"aggregate": ["gwa/.*"]})
    assert add_custom_scalars(trainer, "gradient noise", {"noise": ["gsnr/.*"]})
    assert add_custom_scalars(trainer, "gradient noise", {"noise": ["gsnr/noise.*"]})
    trainer.logger.experiment.flush()
    layouts = _layouts(tmp_path)
    assert layouts[-1] == ["gradient noise", "gradient-weight alignment"]


def test_custom_scalars_without_tensorboard_logger_do_nothing(tmp_path):
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    assert not add_custom_scalars(trainer, "gradient noise", {"noise": ["gsnr/.*"]})
