"""Shared fixtures: a real collector daemon on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracetrain.collector.config import CollectorConfig
from tracetrain.collector.daemon import Collector

# Tests never reach for the network, whatever the caller's environment says.
os.environ.setdefault("OTEL_NODE_RESOURCE_DETECTORS", "env,host,os,process")
for _var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS"):
    os.environ.pop(_var, None)


def make_collector(data_dir: Path, **overrides) -> Collector:
    """A started collector on ephemeral ports (127.0.0.1:0); the caller stops it."""
    options = dict(data_dir=str(data_dir), grpc_endpoint="127.0.0.1:0", http_endpoint="127.0.0.1:0",
                   compact_interval_s=3600.0, log_level="WARNING")
    options.update(overrides)
    return Collector(CollectorConfig(**options)).start()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def collector(data_dir: Path) -> Iterator[Collector]:
    daemon = make_collector(data_dir)
    try:
        yield daemon
    finally:
        daemon.stop()
