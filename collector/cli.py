"""The ``tracetrain`` command line: a thin skin over the library.

The root group finds its commands through the ``tracetrain.cli`` entry-point group
(declared in pyproject.toml), so each component contributes its own commands and
the root never imports the trainer or the instrumentation.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import sys
from pathlib import Path

import click

from tracetrain.collector.config import CollectorConfig, ConfigError, env_var_name, load_config

ENTRY_POINT_GROUP = "tracetrain.cli"


def _version() -> str:
    try:
        return importlib.metadata.version("tracetrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class EntryPointGroup(click.Group):
    """A click group whose subcommands are the ``tracetrain.cli`` entry points."""

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self._entry_points()) | set(self.commands)
        return sorted(name for name in names if self.get_command(ctx, name) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        entry_point = self._entry_points().get(name)
        if entry_point is None:
            return None
        try:
            return entry_point.load()
        except ImportError:  # a component whose optional dependencies are not installed
            return None


@click.group(cls=EntryPointGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="tracetrain")
def main() -> None:
    """tracetrain: train any AI agent from its OpenTelemetry traces.

    Point an agent's OTLP exporter at `tracetrain collector`, query what landed
    with `tracetrain sql`, and train from it.
    """


# ---------------------------------------------------------------- collector


def _config_options(func):
    """One --flag per CollectorConfig field, help text taken from the field."""
    for f in reversed(dataclasses.fields(CollectorConfig)):
        if f.name == "data_dir":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env_var_name(f.name)}; default {f.default!r}]"
        kind = str(f.type)
        if kind.startswith("bool"):
            func = click.option(flag + "/--no-" + f.name.replace("_", "-"), f.name, default=None,
                                help=help_text)(func)
        else:
            type_ = int if kind.startswith("int") else float if kind.startswith("float") else str
            func = click.option(flag, f.name, type=type_, default=None, help=help_text)(func)
    return func


@click.command("collector")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Directory of the span store. [env TRACETRAIN_COLLECTOR_DATA_DIR; default ./tracetrain-data]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TOML file with a [collector] table (default: ./tracetrain.toml if present).")
@_config_options
def collector_command(config_file: str | None, **overrides) -> None:
    """Run the collector daemon: OTLP/gRPC and OTLP/HTTP in, durable span tables out.

    Spans are acknowledged only once they are fsynced into Parquet files under
    DATA/spans/, where any process can query them (`tracetrain sql`) at once.
    The read-only dashboard is served on the HTTP port at /ui (--no-ui: off).
    Stops cleanly on Ctrl-C or SIGTERM.
    """
    from tracetrain.collector.daemon import Collector, limit_malloc_arenas
    from tracetrain.collector.store_layout import StoreError

    try:
        config = load_config(overrides, config_file)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas()
    try:
        collector = Collector(config)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        collector.serve_until_signal()
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


# ---------------------------------------------------------------- sql


@click.command("sql")
@click.argument("query")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default="./tracetrain-data",
              show_default=True, help="Directory of the span store.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json", "parquet"]),
              default="table", show_default=True,
              help="table: a box table; csv; json: one object per line; parquet: needs --output.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write to this file instead of standard output.")
@click.option("--max-rows", type=int, default=40, show_default=True, help="Rows shown by --format table.")
def sql_command(query: str, data_dir: str, output_format: str, output: str | None, max_rows: int) -> None:
    """Run a SQL QUERY over the span store (views: spans, llm_calls, episodes).

    Works while the collector runs: it reads the Parquet files, never the daemon.

    \b
    Example:
      tracetrain sql --data ./tracetrain-data "SELECT model, count(*) FROM llm_calls GROUP BY model"
    """
    import duckdb

    from tracetrain.collector.reader import connect, run_listing_safe

    try:
        con = connect(data_dir)
        relation = con.sql(query)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    except duckdb.Error as exc:
        raise click.ClickException(f"SQL error: {exc}") from None
    if relation is None:
        return
    try:
        run_listing_safe(lambda: _write_relation(con.sql(query), output_format, output, max_rows))
    except duckdb.Error as exc:
        raise click.ClickException(f"SQL error: {exc}") from None


def _write_relation(relation, output_format: str, output: str | None, max_rows: int) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if output_format == "table":
        text = relation.__str__() if relation.shape[0] <= max_rows else relation.limit(max_rows).__str__() + \
            f"({relation.shape[0]} rows, {max_rows} shown; use --max-rows or --format csv)\n"
        _emit(text.encode(), output)
        return
    table = relation.to_arrow_table()
    if output_format == "parquet":
        if not output:
            raise click.UsageError("--format parquet needs --output FILE")
        pq.write_table(table, output, compression="zstd")
    elif output_format == "csv":
        sink = open(output, "wb") if output else sys.stdout.buffer
        try:
            pacsv.write_csv(table, sink)
        finally:
            if output:
                sink.close()
    else:
        lines = "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in table.to_pylist())
        _emit(lines.encode(), output)


def _emit(data: bytes, output: str | None) -> None:
    if output:
        Path(output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


# ---------------------------------------------------------------- gc


@click.command("gc")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, exists=True), default="./tracetrain-data",
              show_default=True, help="Directory of the span store.")
@click.option("--retention-days", type=float, required=True, help="Delete date partitions older than this.")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
def gc_command(data_dir: str, retention_days: float, dry_run: bool) -> None:
    """Delete span partitions older than --retention-days (safe while daemons run)."""
    import datetime as dt

    from tracetrain.collector.compactor import remove_expired_partitions

    if retention_days < 0:
        raise click.UsageError("--retention-days must be >= 0")
    root = Path(data_dir)
    if dry_run:
        cutoff = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=retention_days)
        for directory in sorted((root / "spans").glob("date=*")):
            day = directory.name.removeprefix("date=")
            if day != "1970-01-01" and day < cutoff.isoformat():
                click.echo(f"would remove {directory}")
        return
    removed = remove_expired_partitions(root, retention_days)
    for directory in removed:
        click.echo(f"removed {directory}")
    click.echo(f"{len(removed)} partition(s) removed")
