"""`tracetrain serve` / `model init` as commands: clear error without the serving venv, clean stop on SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tracetrain.trainer import cli_serving, serving


def test_serve_without_serving_venv_says_make_serve_env(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = CliRunner().invoke(cli_serving.serve_command, ["--model", str(tmp_path)],
                           env={"TRACETRAIN_SERVE_VENV": str(tmp_path / "nope")})
    assert r.exit_code != 0
    assert "make serve-env" in r.output


def test_model_init_command(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    r = CliRunner().invoke(cli_serving.model_group, ["init", "--out", str(tmp_path / "m"), "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "sha256" in r.output and (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.slow
def test_serve_command_starts_and_stops_on_sigterm(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    try:
        serving.serve_python()
    except serving.ServeEnvMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    from tracetrain.trainer import model_init
    m = model_init.init_model(tmp_path / "m")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from tracetrain.trainer.cli_serving import serve_command; "
                             "serve_command()", "--model", str(m), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        assert any(f"http://127.0.0.1:{port}/v1" in x for x in lines), "".join(lines)
        status, data, _ = serving.http_json(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and data["data"][0]["id"] == "policy-base"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        print(f"stopped in {time.monotonic() - t0:.1f}s")
        assert rc == 0
        with pytest.raises(OSError):
            serving.http_json(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        # nothing left in the server's process group
        out = subprocess.run(["pgrep", "-f", f"api_server.*--port {port}"], capture_output=True, text=True).stdout.strip()
        assert out == ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
