"""tracetrain plot: curves from train_steps into an image; clear errors without rows."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from tracetrain.collector.reader import write_views_file
from tracetrain.trainer.cli_train import plot_command
from tracetrain.trainer.train_tables import write_train_step


def test_plot_writes_png_and_explains_empty(tmp_path):
    (tmp_path / "spans").mkdir()
    write_views_file(tmp_path)
    r = CliRunner().invoke(plot_command, ["--data", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "no train_steps rows" in r.output
    for step in range(1, 6):
        write_train_step(tmp_path, {"run_id": "r1", "step": step, "reward_mean": step / 10, "success_rate": step / 20,
                                    "loss": -step / 100, "kl": None})
    write_train_step(tmp_path, {"run_id": "r2", "step": 1, "reward_mean": 0.3, "loss": 0.1})
    out = tmp_path / "curves.png"
    r = CliRunner().invoke(plot_command, ["--data", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 steps of 2 run(s) (r1, r2)" in r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    r = CliRunner().invoke(plot_command, ["--data", str(tmp_path), "--out", str(out), "--run-id", "r3"])
    assert r.exit_code == 1 and "for run 'r3'" in r.output
