"""Configuration precedence: defaults < tracetrain.toml < TRACETRAIN_COLLECTOR_* < flags."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tracetrain.collector.cli import main
from tracetrain.collector.config import CollectorConfig, ConfigError, load_config


def test_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config({}, environ={}) == CollectorConfig()
    (tmp_path / "tracetrain.toml").write_text(
        '[collector]\ndata_dir = "from-toml"\nmax_pending_bytes = 1000\nfsync = false\nretention_days = 3\n')
    cfg = load_config({}, environ={})
    assert (cfg.data_dir, cfg.max_pending_bytes, cfg.fsync, cfg.retention_days) == ("from-toml", 1000, False, 3.0)
    env = {"TRACETRAIN_COLLECTOR_DATA_DIR": "from-env", "TRACETRAIN_COLLECTOR_FSYNC": "true"}
    cfg = load_config({}, environ=env)
    assert (cfg.data_dir, cfg.max_pending_bytes, cfg.fsync) == ("from-env", 1000, True)
    cfg = load_config({"data_dir": "from-flag", "max_pending_bytes": None}, environ=env)
    assert (cfg.data_dir, cfg.max_pending_bytes) == ("from-flag", 1000)


@pytest.mark.parametrize("bad, message", [
    ({"max_pending_bytes": 0}, "max_pending_bytes must be positive"),
    ({"tls_cert_file": "x.pem"}, "go together"),
    ({"grpc_endpoint": "", "http_endpoint": ""}, "at least one"),
    ({"retention_days": -1}, "retention_days"),
])
def test_bad_values_are_named(bad, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_config(bad, environ={})


def test_bad_env_and_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_config({}, environ={"TRACETRAIN_COLLECTOR_MAX_REQUEST_BYTES": "lots"})
    (tmp_path / "tracetrain.toml").write_text("[collector]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config({}, environ={})


def test_cli_reports_config_errors_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["collector", "--max-pending-bytes", "0"])
    assert result.exit_code == 2 and "max_pending_bytes must be positive" in result.output


def test_cli_reports_a_taken_port(tmp_path, collector):
    result = CliRunner().invoke(main, ["collector", "--data", str(tmp_path / "d2"),
                                       "--grpc-endpoint", f"127.0.0.1:{collector.grpc_port}",
                                       "--http-endpoint", "127.0.0.1:0"])
    assert result.exit_code == 1 and "cannot listen" in result.output
