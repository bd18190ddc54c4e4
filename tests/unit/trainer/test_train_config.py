"""TrainConfig: defaults < tracetrain.toml [train] < TRACETRAIN_TRAIN_* < flags; every field documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracetrain.trainer.cli_train import flag_name, train_command
from tracetrain.trainer.train_config import TrainConfig, TrainConfigError, env_var_name, load_train_config

ROOT = Path(__file__).resolve().parents[3]


def test_precedence(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[train]\nlr = 0.1\ngroup_size = 4\nbatch_episodes = 8\nagents = ["a", "b"]\nlora = true\n')
    env = {"TRACETRAIN_TRAIN_GROUP_SIZE": "2", "TRACETRAIN_TRAIN_MAX_STEPS": "5", "TRACETRAIN_TRAIN_AGENTS": "x,y"}
    cfg = load_train_config({"max_steps": 9, "lr": None}, toml, env)
    assert (cfg.lr, cfg.group_size, cfg.max_steps, cfg.agents, cfg.lora) == (0.1, 2, 9, ("x", "y"), True)
    assert load_train_config({}, None, {}).learning_rate == 2e-4
    assert load_train_config({"lora": True}, None, {}).learning_rate == 1e-3
    assert load_train_config({}, None, {"TRACETRAIN_TRAIN_MAX_STALENESS": "none"}).max_staleness is None


@pytest.mark.parametrize("bad, match", [
    ({"algo": "dpo"}, "algo must be one of"), ({"group_size": 0}, "group_size must be positive"),
    ({"batch_episodes": 4, "group_size": 8}, "at least one group"), ({"max_steps": "x"}, "max_steps"),
    ({"nope": 1}, "unknown train option")])
def test_bad_values_name_the_setting(bad, match):
    with pytest.raises(TrainConfigError, match=match):
        load_train_config(bad, None, {})


def test_unknown_toml_key(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(TrainConfigError, match="unknown keys"):
        load_train_config({}, toml, {})


def test_every_train_setting_is_documented_and_a_flag():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    help_text = CliRunner().invoke(train_command, ["--help"], terminal_width=400).output
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in doc and env_var_name(f.name) in doc, f"docs/configuration.md lacks {f.name}"
        assert f.metadata["help"] in doc, f.name
        assert flag_name(f.name) in help_text, f.name


def test_cli_bad_input_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(train_command, ["--data", str(tmp_path), "--group-size", "0", "--model", "m"])
    assert r.exit_code == 2 and "group_size must be positive" in r.output
    r = CliRunner().invoke(train_command, ["--data", str(tmp_path)])
    assert r.exit_code == 2 and "--model is required" in r.output
    r = CliRunner().invoke(train_command, ["--data", str(tmp_path), "--model", str(tmp_path)])
    assert r.exit_code == 1 and "not a tracetrain span store" in r.output and "Traceback" not in r.output
