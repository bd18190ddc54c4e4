"""``tracetrain reward``: attach a delayed reward to an episode (``POST /v1/rewards``).

A thin HTTP client (standard library only) of the collector's feedback endpoint.
Without ``--reward-id`` it makes one up, and uses the same one for its own retries,
so a retried request never counts twice.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
import uuid

import click

DEFAULT_COLLECTOR = "http://127.0.0.1:4318"
_RETRYABLE = {429, 502, 503, 504}


def _attribute(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)  # numbers, booleans, quoted strings
    except ValueError:
        value = raw
    return key, value


def post_reward(collector: str, payload: dict, token: str | None = None, cafile: str | None = None,
                timeout_s: float = 30.0, attempts: int = 5) -> tuple[int, dict]:
    """POST ``payload`` to ``collector``/v1/rewards; retry 429/502/503/504 and connection errors.

    Returns the final HTTP status and the decoded JSON body.
    """
    url = collector.rstrip("/") + "/v1/rewards"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    data = json.dumps(payload).encode()
    delay = 0.5
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code not in _RETRYABLE or attempt == attempts - 1:
                try:
                    return exc.code, json.loads(body or b"{}")
                except ValueError:
                    return exc.code, {"message": body.decode("utf-8", "replace")[:500]}
            retry_after = exc.headers.get("Retry-After", "")
            delay = float(retry_after) if retry_after.isdigit() else delay
        except (urllib.error.URLError, OSError) as exc:
            if attempt == attempts - 1:
                raise click.ClickException(f"cannot reach the collector at {url}: {exc}") from None
        time.sleep(min(delay, 30.0))
        delay *= 2
    raise AssertionError("unreachable")


@click.command("reward")
@click.option("--collector", default=DEFAULT_COLLECTOR, show_default=True, envvar="TRACETRAIN_COLLECTOR_URL",
              help="The collector's HTTP endpoint (its OTLP/HTTP port). [env TRACETRAIN_COLLECTOR_URL]")
@click.option("--episode", "episode_id", required=True, help="Episode id (tracetrain.episode.id, or the trace id).")
@click.option("--value", type=float, required=True, help="The reward.")
@click.option("--name", default=None, help="Which reward this is, e.g. user_feedback (tracetrain.reward.name).")
@click.option("--reward-id", default=None,
              help="Idempotency key: sending the same id again stores nothing. Default: a new UUID.")
@click.option("--attr", "attributes", multiple=True, metavar="KEY=VALUE",
              help="Extra attribute on the reward span (VALUE parsed as JSON if it can be). Repeatable.")
@click.option("--token", default=None, envvar="TRACETRAIN_COLLECTOR_AUTH_TOKEN",
              help="Bearer token, when the collector runs with --auth-token. [env TRACETRAIN_COLLECTOR_AUTH_TOKEN]")
@click.option("--cacert", type=click.Path(dir_okay=False, exists=True), default=None,
              help="PEM CA file for an https:// collector with a private certificate.")
def reward_command(collector: str, episode_id: str, value: float, name: str | None, reward_id: str | None,
                   attributes: tuple[str, ...], token: str | None, cacert: str | None) -> None:
    """Attach a delayed reward to a finished episode, durably and idempotently.

    The collector stores it as a reward span of the episode, so the episodes view
    picks it up (the latest reward by time wins; reward_sum and n_rewards count
    each reward id once). Exits 1 if the episode is unknown or the request is refused.

    \b
    Example:
      tracetrain reward --episode ep-42 --value 1.0 --name user_feedback
    """
    payload: dict = {"episode_id": episode_id, "value": value, "reward_id": reward_id or uuid.uuid4().hex}
    if name:
        payload["name"] = name
    if attributes:
        payload["attributes"] = dict(_attribute(a) for a in attributes)
    status, body = post_reward(collector, payload, token, cacert)
    if status != 200:
        raise click.ClickException(f"HTTP {status}: {body.get('message') or body}")
    click.echo(json.dumps(body))
