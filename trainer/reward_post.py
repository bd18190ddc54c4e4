"""Store computed rewards durably: POST them to the collector's ``/v1/rewards`` as delayed rewards.

The collector writes each as a reward span of its episode, so ``episodes.reward``, the
trainer and the dashboard see it like an emitted one. The reward id is derived from
(name, episode, value): posting the same result twice stores it once, and a changed
value is a new reward that wins by time (``episodes.reward`` is the latest one).
Standard library only; the trainer does not import the collector's client.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass
class PostReport:
    stored: int = 0
    duplicate: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # episode id -> why


def reward_id_for(name: str, episode_id: str, value: float) -> str:
    """The idempotency key of one computed reward."""
    digest = hashlib.sha256(f"{name}\x00{episode_id}\x00{value!r}".encode()).hexdigest()
    return f"score-{digest[:32]}"


def _post(url: str, payload: dict, token: str | None, timeout_s: float, attempts: int) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(payload).encode()
    delay_s = 0.5
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code not in RETRYABLE_STATUS or attempt == attempts - 1:
                try:
                    return exc.code, json.loads(body or b"{}")
                except ValueError:
                    return exc.code, {"message": body.decode("utf-8", "replace")[:300]}
        except (urllib.error.URLError, OSError) as exc:
            if attempt == attempts - 1:
                return 0, {"message": f"cannot reach {url}: {getattr(exc, 'reason', exc)}"}
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 8.0)
    raise AssertionError("unreachable")


def post_rewards(collector_url: str, rewards: Mapping[str, float], name: str = "computed",
                 token: str | None = None, timeout_s: float = 30.0, attempts: int = 5) -> PostReport:
    """POST each ``{episode_id: value}`` to ``collector_url``/v1/rewards; returns what happened to each.

    Args:
        collector_url: the collector's OTLP/HTTP endpoint, e.g. ``http://127.0.0.1:4318``.
        name: ``tracetrain.reward.name`` of the stored rewards (which function computed them).
        token: bearer token when the collector runs with ``--auth-token``.
    """
    url = collector_url.rstrip("/") + "/v1/rewards"
    report = PostReport()
    for episode_id, value in rewards.items():
        payload = {"episode_id": episode_id, "value": float(value), "name": name,
                   "reward_id": reward_id_for(name, episode_id, float(value)),
                   "attributes": {"tracetrain.reward.source": "tracetrain score"}}
        status, body = _post(url, payload, token, timeout_s, attempts)
        if status == 200:
            if body.get("duplicate"):
                report.duplicate += 1
            else:
                report.stored += 1
        else:
            report.failed[episode_id] = f"HTTP {status}: {body.get('message') or body}" if status else \
                str(body.get("message"))
    return report
