"""Module-scoped fixtures for tests against a real vLLM: a tiny model and a server for it.

Import them into a test module (``from tests.integration.vllm_fixtures import model_dir, server``).
Without the serving venv the tests skip, except under CI=true where that is a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tracetrain.trainer import model_init, serving

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(model_init.init_model(tmp_path_factory.mktemp("tiny") / "m", size="tiny", seed=0))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    try:
        serving.serve_python()
    except serving.ServeEnvMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the serving venv is missing: {exc}")
        pytest.skip(f"{exc} (set CI=true to make this a failure)")
    work = tmp_path_factory.mktemp("serve")
    handle = serving.start_server(model_dir, free_port(), log_path=str(work / "vllm.log"), timeout=600)
    yield handle
    handle.stop()
    assert not handle.alive()


def run_quick_example(script: str, work: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``examples/<script> --quick --workdir work`` and check it exits 0; its output is returned.

    The examples start `tracetrain serve`: without .venv-serve this skips, or fails under CI.
    """
    if not SERVE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-serve is missing in CI (make serve-env)")
        pytest.skip("no .venv-serve (make serve-env)")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done
