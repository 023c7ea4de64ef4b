"""Under DDP (2 CPU processes, gloo) the epoch aggregate and the per-sample scores equal the
single-process values over the union of both ranks' samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ddp_scripts import DDP_TEARDOWN

# The script's model is float32 and the per-sample scores are cosines (bounded by 1) computed in
# float32 from reductions whose rounding depends on which samples share a batch, and the batches
# differ between one and two processes. So scores, their mean and the aggregates built from them
# agree only to a few float32 ulps of 1 in absolute terms, not relatively: a per-layer GWA of
# ~5e-4 differs by ~2e-9 (4e-6 relative). The epoch means and aggregates are averages of scores,
# so the same absolute bound holds for them.
SCORE_ATOL = 16 * torch.finfo(torch.float32).eps

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning_gradwatch import GradientWeightAlignment, IndexedDataset

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            # lr = 0 keeps the weights fixed, so every sample's score is independent of which
            # rank or batch it lands in: the DDP run must reproduce the single-process scores.
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def main(out, devices):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
        gwa = GradientWeightAlignment(params="all", indices=-1)
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", devices=devices,
            strategy="ddp" if devices > 1 else "auto", callbacks=[gwa],
            logger=TensorBoardLogger(out, name=f"tb_{devices}"),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False)
        trainer.fit(Model(), loader)
        result = {
            "rank": trainer.global_rank,
            "history": gwa.history,
            "layers": gwa.layer_history,
            "scores": gwa.sample_scores()["score"].tolist(),
            "index": gwa.sample_scores()["index"].tolist(),
            "gwa_epoch": float(trainer.callback_metrics["gwa/aggregate"]),
        }
        with open(f"{out}/result_{devices}_{trainer.global_rank}.json", "w") as f:
            json.dump(result, f)

    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]))
    """
)


@pytest.mark.slow
def test_ddp_aggregate_equals_single_process_union(tmp_path: Path) -> None:
    script = tmp_path / "gwa_ddp_script.py"
    script.write_text(SCRIPT + DDP_TEARDOWN)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LOCAL_RANK", None)
    for devices in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(devices)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "result_1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"result_2_{r}.json").read_text()) for r in (0, 1)]
    assert single["index"] == list(range(40))
    # Kurtosis is a ratio of central moments: moving scores of spread `std` by SCORE_ATOL moves
    # it by O(SCORE_ATOL / std) (4 * m4/m2^2 relative per unit of relative spread change).
    kurt_atol = 8 * SCORE_ATOL / torch.tensor(single["scores"]).std().item()
    for ddp in ranks:
        assert [h["count"] for h in ddp["history"]] == [40.0, 40.0]  # the union, not a shard
        for mine, ref in zip(ddp["history"], single["history"], strict=True):
            for key in ("gwa", "mean"):
                assert mine[key] == pytest.approx(ref[key], rel=1e-6, abs=SCORE_ATOL)
            assert mine["kurtosis"] == pytest.approx(ref["kurtosis"], rel=1e-6, abs=kurt_atol)
        for name, values in single["layers"].items():
            assert ddp["layers"][name] == pytest.approx(values, rel=1e-6, abs=SCORE_ATOL)
        # per-sample scores were merged across ranks at the epoch end
        assert ddp["index"] == single["index"]
        assert ddp["scores"] == pytest.approx(single["scores"], rel=1e-6, abs=SCORE_ATOL)
        assert ddp["gwa_epoch"] == pytest.approx(single["gwa_epoch"], rel=1e-6, abs=SCORE_ATOL)
    # the TensorBoard histogram (rank zero) counts both ranks' scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb_2" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    assert [h.histogram_value.num for h in events.Histograms("gwa/scores")] == [40, 40]
