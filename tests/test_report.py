"""``lightning-gradwatch report``: a real tiny fit with the callbacks, then the HTML page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import (
    GradientSNR,
    GradientWeightAlignment,
    GWAEarlyStopping,
    IndexedDataset,
    SpectralNorms,
)
from lightning_gradwatch.report import (
    KEYS,
    LAYER_KEYS,
    ReportError,
    build_report,
    main,
    read_scalars,
)


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GradientWeightAlignment]:
    """4 epochs x 4 steps with the README's callbacks, logging every step."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    loader = DataLoader(IndexedDataset(data), batch_size=16, shuffle=True)
    gwa = GradientWeightAlignment(indices=-1, write_scores=True)
    logger = TensorBoardLogger(root, name="tb")
    trainer = pl.Trainer(
        max_epochs=4,
        default_root_dir=root,
        logger=logger,
        callbacks=[
            gwa,
            GWAEarlyStopping(rule="argmax", patience=10),
            GradientSNR(),
            SpectralNorms(),
        ],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), loader)
    return Path(logger.log_dir), gwa


def test_report_renders_every_section(fitted_run: tuple[Path, Any], tmp_path: Path) -> None:
    run, gwa = fitted_run
    page = build_report(run.parent, tmp_path / "out")  # the parent holds exactly one run
    text = page.read_text()
    for section in ("gwa", "spectral", "gsnr-layers", "noise", "misaligned"):
        assert f'<section id="{section}">' in text
    assert 'class="note"' not in text  # every metric was found

    images = re.findall(r'<img src="([^"]+)"', text)
    assert sorted(images) == sorted(
        ["gwa.png", "spectral.png", "gsnr-layers.png", "noise.png", "scores.png"]
    )
    for name in images:
        data = (page.parent / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name

    # The selected epoch is the one GWAEarlyStopping logged: its own selection, the argmax
    # of the epoch values the GWA callback recorded.
    values = [h["gwa"] for h in gwa.history]
    expected = [int(h["epoch"]) for h in gwa.history][values.index(max(values))]
    assert gwa.epoch_selector.best_epoch == expected
    assert f'<strong id="selected-epoch">{expected}</strong>' in text
    assert "logged by the run (gwa/selected_epoch)" in text

    # The table lists the lowest scores of that epoch's file, lowest first.
    lines = (run / "gwa_scores" / f"epoch_{expected:04d}.csv").read_text().splitlines()[1:]
    rows = sorted((float(s), int(i)) for i, s in (line.split(",") for line in lines))
    table = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>([^<]+)</td></tr>", text)
    assert len(table) == 20
    assert [int(i) for _, i, _ in table] == [i for _, i in rows[:20]]
    assert float(table[0][2]) == pytest.approx(rows[0][0], rel=1e-5)


def test_report_scalars_match_the_callback(fitted_run: tuple[Path, Any]) -> None:
    run, gwa = fitted_run
    scalars = read_scalars(run)
    # TensorBoard stores scalars as float32.
    assert scalars[KEYS["gwa_aggregate"]].values == pytest.approx(
        [h["gwa"] for h in gwa.history], rel=1e-6
    )


def test_missing_metrics_give_notes(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(3):
        writer.add_scalar("train_loss", 1.0 / (step + 1), step)
    writer.close()
    text = build_report(tmp_path / "run").read_text()
    assert "<img" not in text
    assert text.count('class="note"') == 5
    assert "write_scores=True" in text and "GradientSNR not attached" in text


def test_logged_selected_epoch_wins_over_argmax(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for epoch, value in enumerate([0.1, 0.3, 0.2]):
        writer.add_scalar(KEYS["gwa_aggregate"], value, 10 * epoch + 9)
        writer.add_scalar(KEYS["epoch"], epoch, 10 * epoch + 9)
    writer.add_scalar(KEYS["gwa_selected_epoch"], 2, 29)
    writer.close()
    text = build_report(tmp_path).read_text()
    assert '<strong id="selected-epoch">2</strong>' in text
    assert "logged by the run" in text


def test_runs_logged_under_former_names_are_read(tmp_path: Path) -> None:
    """A run from a version before the naming scheme: its tags are read as the current ones."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for epoch, value in enumerate([0.1, 0.3, 0.2]):
        writer.add_scalar("gwa/epoch", value, 10 * epoch + 9)
        writer.add_scalar("gwa/layer/net.2.weight", value, 10 * epoch + 9)
        writer.add_scalar("spectral/net.0.weight/sigma_max", 1.0 + epoch, 10 * epoch + 9)
        writer.add_scalar("gsnr/noise_scale", 4.0, 10 * epoch + 9)
    writer.close()
    scalars = read_scalars(tmp_path)
    assert scalars[KEYS["gwa_aggregate"]].values == pytest.approx([0.1, 0.3, 0.2])
    assert "gwa_layers/aggregate/net.2.weight" in scalars
    assert scalars["spectral_layers/sigma_max/net.0.weight"].values == [1.0, 2.0, 3.0]
    assert KEYS["noise_scale"] in scalars and "gwa/epoch" not in scalars
    assert re.match(LAYER_KEYS["spectral_sigma_max"], "spectral_layers/sigma_max/net.0.weight")
    # no stopper's selection in this run: the page marks the argmax and says so
    text = build_report(tmp_path, tmp_path / "out").read_text()
    assert '<strong id="selected-epoch">1</strong>' in text
    assert "the argmax of gwa/aggregate" in text


def test_bad_logdir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no TensorBoard event files" in capsys.readouterr().err


def test_module_entry_point(fitted_run: tuple[Path, Any], tmp_path: Path) -> None:
    run, _ = fitted_run
    done = subprocess.run(
        [sys.executable, "-m", "lightning_gradwatch.report", str(run), "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == tmp_path / "index.html"
