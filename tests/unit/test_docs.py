"""Docs stay true to the code: commands, columns, settings, and runnable snippets."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracetrain.collector.cli import main
from tracetrain.collector.config import CollectorConfig, env_var_name
from tracetrain.collector.schema import SPAN_SCHEMA
from tracetrain.instrumentation import semconv as sc

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = main.list_commands(None)


def test_cli_has_commands():
    assert {"collector", "sql", "gc"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented_and_has_help(command):
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    assert f"`tracetrain {command}`" in cli_doc, f"docs/cli.md does not document `tracetrain {command}`"
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output
    assert len(main.get_command(None, command).help or "") > 20


def test_version_and_root_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip().startswith("tracetrain, version ")
    assert runner.invoke(main, ["--help"]).exit_code == 0
    out = subprocess.run([sys.executable, "-m", "tracetrain.collector", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)


def test_every_column_is_documented():
    schema_doc = (ROOT / "docs" / "schema.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", schema_doc, re.M))
    assert set(SPAN_SCHEMA.names) <= documented
    assert f"**Schema version: {sc.SCHEMA_VERSION}.**" in schema_doc


def test_every_setting_is_documented():
    config_doc = (ROOT / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(CollectorConfig):
        row = f"| `{f.name}` |"
        assert row in config_doc, f"docs/configuration.md lacks {f.name}"
        assert env_var_name(f.name) in config_doc and f.metadata["help"] in config_doc
    collector_help = CliRunner().invoke(main, ["collector", "--help"], terminal_width=400).output
    for f in dataclasses.fields(CollectorConfig):
        flag = "--data" if f.name == "data_dir" else "--" + f.name.replace("_", "-")
        assert flag in collector_help


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_querying_doc_python_snippets_run(tmp_path, collector, data_dir):
    """The plain duckdb / pandas / polars snippets of docs/querying.md work on a real store."""
    from tests.integration.spanfactory import EXPORT_METHOD, make_request
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        channel.unary_unary(EXPORT_METHOD)(make_request(4)[0], timeout=10)
    doc = (ROOT / "docs" / "querying.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(snippets) >= 4
    for snippet in snippets:
        code = snippet.replace("tracetrain-data", str(data_dir))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 0, f"snippet failed:\n{snippet}\n{out.stderr}"
