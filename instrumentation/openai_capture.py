"""Token ids and logprobs on the LLM spans of OpenAI-client calls (vLLM endpoints).

``TracetrainOpenAIInstrumentor`` is an OpenTelemetry instrumentor, loaded by
``opentelemetry-instrument`` / ``tracetrain run`` through the
``opentelemetry_instrumentor`` entry point ``tracetrain_openai``. For every chat
completion (and legacy completion) the OpenAI Python client sends, sync or async,
streamed or not, it

1. asks the endpoint for ``return_token_ids: true`` and ``logprobs: true`` unless
   the caller set them, TRACETRAIN_CAPTURE_TOKEN_IDS=false, the call is a raw-response
   call, or the endpoint is known not to be vLLM;
2. if the endpoint refuses the request (400/422) because of those fields, resends it
   exactly as the caller made it and remembers that base URL;
3. writes the ids, logprobs, response model and policy version (response header
   ``x-tracetrain-policy-version``, else TRACETRAIN_POLICY_VERSION) onto the current LLM
   span: the ``openai.chat`` span of opentelemetry-instrumentation-openai when it is
   active, else a ``chat {model}`` span of its own (genai_span.py). When no ids came
   back it says why (``tracetrain.token_ids.unavailable_reason``) and invents nothing.

Where it hooks, and why there: the client's ``request`` (and ``_process_response``
for the header), not ``Completions.create``. Every LLM instrumentation wraps
``Completions.create``, so ``request`` runs inside their span whatever order the
instrumentors were loaded in, and a stream proxy returned from here is always the
innermost one: it sees the end of the stream before the outer instrumentation ends
its span. Entry-point order is not defined, so this is the only order-proof place.
``request`` is also looked up on the client class at every call (``post`` is bound
into each resource when it is created), so instrumenting after a client exists works.

Nothing here raises into the agent: each wrapper step catches its own errors,
counts a drop (drops.py) and lets the call go on unchanged. The OpenAI call's own
errors propagate exactly as without tracetrain.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

import wrapt
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.trace import SpanKind, Status, StatusCode

from tracetrain.instrumentation import env, genai_span
from tracetrain.instrumentation import semconv as sc
from tracetrain.instrumentation.drops import record_drop
from tracetrain.instrumentation.stream_proxy import wrap_stream
from tracetrain.instrumentation.token_capture import (
    CHAT, REASON_DISABLED, REASON_ERROR, REASON_HOSTED, REASON_NOT_IN_RESPONSE, REASON_RAW, REASON_REJECTED,
    TEXT_COMPLETION, Capture, StreamAccumulator, augment_request, capture_response,
)

SCOPE_NAME = "tracetrain.instrumentation.openai"
_OPERATIONS = {"/chat/completions": CHAT, "/completions": TEXT_COMPLETION}
_RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"  # openai._constants.RAW_RESPONSE_HEADER
_REJECTION_STATUS_CODES = (400, 422)
_HOSTED_HOSTS = ("api.openai.com",)
_HOSTED_HOST_SUFFIXES = (".openai.azure.com",)
_TARGETS = ("SyncAPIClient.request", "AsyncAPIClient.request",
            "SyncAPIClient._process_response", "AsyncAPIClient._process_response")


class _State:
    """Process-wide instrumentor state (the instrumentor itself is a singleton)."""

    active = False
    patched = False
    tracer: trace.Tracer | None = None
    rejecting_base_urls: set[str] = set()  # endpoints that refused the extra fields once


_active_call: contextvars.ContextVar[_LlmCall | None] = contextvars.ContextVar("tracetrain_llm_call", default=None)


class TracetrainOpenAIInstrumentor(BaseInstrumentor):
    """Adds token ids and logprobs to the LLM spans of OpenAI-client calls (see module doc)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("openai >= 1.0",)

    def _instrument(self, **kwargs: Any) -> None:
        try:
            _State.tracer = trace.get_tracer(SCOPE_NAME, tracer_provider=kwargs.get("tracer_provider"))
            _State.active = True
            # Patch when (and only if) the agent imports openai: no import cost for agents that never do.
            wrapt.register_post_import_hook(_patch_openai, "openai")
        except Exception as error:  # noqa: BLE001 - an instrumentor must not stop the others loading
            record_drop("instrument_failed", error)

    def _uninstrument(self, **kwargs: Any) -> None:
        _State.active = False
        try:
            _unpatch_openai()
        except Exception as error:  # noqa: BLE001
            record_drop("uninstrument_failed", error)


def forget_rejecting_endpoints() -> None:
    """Forget which endpoints refused the extra fields (tests; a restarted endpoint)."""
    _State.rejecting_base_urls.clear()


def _patch_openai(_module: Any = None) -> None:
    if not _State.active or _State.patched:
        return
    try:
        base_client = importlib.import_module("openai._base_client")
        wrapt.wrap_function_wrapper(base_client, "SyncAPIClient.request", _sync_request)
        wrapt.wrap_function_wrapper(base_client, "AsyncAPIClient.request", _async_request)
        wrapt.wrap_function_wrapper(base_client, "SyncAPIClient._process_response", _note_response_headers)
        wrapt.wrap_function_wrapper(base_client, "AsyncAPIClient._process_response", _note_response_headers)
        _State.patched = True
    except Exception as error:  # noqa: BLE001 - an openai version we do not know: capture off, agent fine
        record_drop("patch_failed", error)


def _unpatch_openai() -> None:
    if not _State.patched:
        return
    base_client = importlib.import_module("openai._base_client")
    ours = (_sync_request, _async_request, _note_response_headers)
    for target in _TARGETS:
        class_name, method_name = target.split(".")
        cls = getattr(base_client, class_name)
        method = cls.__dict__.get(method_name)
        if getattr(method, "_self_wrapper", None) in ours:
            setattr(cls, method_name, method.__wrapped__)
        else:  # someone wrapped on top of us: leave their wrapper (and ours under it) in place
            record_drop("unpatch_skipped")
    _State.patched = False


# ---------------------------------------------------------------- wrappers


def _sync_request(wrapped, instance, args, kwargs):
    call = _LlmCall.begin(instance, args, kwargs)
    if call is None:
        return wrapped(*args, **kwargs)
    tokens = call.enter()
    try:
        if call.augmented is not None:
            try:
                result = wrapped(*call.augmented[0], **call.augmented[1])
            except Exception as error:
                if not call.is_field_rejection(error):
                    raise
                result = wrapped(*call.plain[0], **call.plain[1])  # the caller's request, as it made it
                call.remember_rejection()
        else:
            result = wrapped(*call.plain[0], **call.plain[1])
    except BaseException as error:
        call.fail(error)
        raise
    finally:
        call.exit(tokens)
    return call.finish(result, is_async=False)


def _async_request(wrapped, instance, args, kwargs):
    call = _LlmCall.begin(instance, args, kwargs)
    if call is None:
        return wrapped(*args, **kwargs)
    return _async_request_call(call, wrapped)


async def _async_request_call(call: _LlmCall, wrapped):
    tokens = call.enter()
    try:
        if call.augmented is not None:
            try:
                result = await wrapped(*call.augmented[0], **call.augmented[1])
            except Exception as error:
                if not call.is_field_rejection(error):
                    raise
                result = await wrapped(*call.plain[0], **call.plain[1])
                call.remember_rejection()
        else:
            result = await wrapped(*call.plain[0], **call.plain[1])
    except BaseException as error:
        call.fail(error)
        raise
    finally:
        call.exit(tokens)
    return call.finish(result, is_async=True)


def _note_response_headers(wrapped, instance, args, kwargs):
    """Keep the policy-version header for the LLM call in flight (sync and async alike:
    the header is read before the coroutine, if any, is returned)."""
    call = _active_call.get()
    if call is not None:
        try:
            response = kwargs.get("response")
            if response is not None:
                call.policy_header = response.headers.get(sc.POLICY_VERSION_HEADER)
        except Exception as error:  # noqa: BLE001
            record_drop("header_read_failed", error)
    return wrapped(*args, **kwargs)


# ---------------------------------------------------------------- one call


@functools.lru_cache(maxsize=64)
def _is_hosted(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host in _HOSTED_HOSTS or host.endswith(_HOSTED_HOST_SUFFIXES)


def _options_copy(options: Any, **changes: Any) -> Any:
    """A shallow copy of the client's FinalRequestOptions with ``changes``: the caller's object
    stays as it was, so the plain retry sends exactly what the caller asked for."""
    changed = copy.copy(options)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


def _with_options(args: tuple, kwargs: dict[str, Any], options: Any) -> tuple[tuple, dict[str, Any]]:
    if len(args) > 1:
        return (args[0], options, *args[2:]), kwargs
    return args, {**kwargs, "options": options}


class _LlmCall:
    """One chat/completion request in flight: its span, what was added, how it ended."""

    def __init__(self, operation: str, body: Mapping[str, Any], base_url: str, span: trace.Span, owns_span: bool,
                 stream: bool):
        self.operation, self.body, self.base_url = operation, body, base_url
        self.span, self.owns_span, self.stream = span, owns_span, stream
        self.with_content = owns_span and env.message_content_enabled()
        self.unavailable_reason: str | None = None
        self.policy_header: str | None = None
        self.augmented: tuple[tuple, dict[str, Any]] | None = None  # (args, kwargs) with the extra fields
        self.plain: tuple[tuple, dict[str, Any]] = ((), {})  # (args, kwargs) as the caller made them
        self.closed = False

    @classmethod
    def begin(cls, instance: Any, args: tuple, kwargs: dict[str, Any]) -> _LlmCall | None:
        """A call to capture, or None to pass the request through untouched. Never raises.

        ``args``/``kwargs`` are those of ``request(cast_to, options, *, stream, stream_cls)``.
        """
        try:
            options = args[1] if len(args) > 1 else kwargs.get("options")
            operation = _OPERATIONS.get(getattr(options, "url", None))
            body = getattr(options, "json_data", None)
            if (operation is None or not isinstance(body, Mapping) or _State.tracer is None
                    or str(getattr(options, "method", "")).lower() != "post"):
                return None
            base_url = str(getattr(instance, "base_url", ""))
            current = trace.get_current_span()
            owns_span = not genai_span.is_llm_span(current)
            span = current
            if owns_span:
                span = _State.tracer.start_span(
                    genai_span.span_name(operation, body), kind=SpanKind.CLIENT,
                    attributes=genai_span.request_attributes(operation, body, base_url,
                                                             env.message_content_enabled()))
            if not span.is_recording():  # no SDK, or sampled out: nothing would be kept
                if owns_span:
                    span.end()
                return None
            call = cls(operation, body, base_url, span, owns_span, kwargs.get("stream") is True)
            call._plan(options, args, kwargs)
            return call
        except Exception as error:  # noqa: BLE001
            record_drop("capture_setup_failed", error)
            return None

    def _plan(self, options: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Decide what to add to the request and build the (args, kwargs) to send, plain and augmented."""
        headers = getattr(options, "headers", None)
        headers = headers if isinstance(headers, Mapping) else {}  # NotGiven when the caller set none
        additions = None
        if headers.get(_RAW_RESPONSE_HEADER):
            self.unavailable_reason = REASON_RAW  # the caller parses the raw response itself
        elif not env.capture_token_ids_enabled():
            self.unavailable_reason = REASON_DISABLED
        elif self.base_url in _State.rejecting_base_urls:
            self.unavailable_reason = REASON_REJECTED
        elif _is_hosted(self.base_url):
            self.unavailable_reason = REASON_HOSTED
        else:
            additions = augment_request(self.body, getattr(options, "extra_json", None), self.operation)
        self.plain = (args, kwargs)
        if self.owns_span:  # continue the trace into the server (vLLM parents its llm_request span on it)
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(self.span))
            if carrier:
                self.plain = _with_options(args, kwargs, _options_copy(options, headers={**headers, **carrier}))
        if additions:
            plain_options = self.plain[0][1] if len(self.plain[0]) > 1 else self.plain[1]["options"]
            self.augmented = _with_options(args, kwargs, _options_copy(plain_options,
                                                                       json_data={**self.body, **additions}))

    def enter(self) -> tuple[Any, Any]:
        """Make this call findable by the header hook, and our own span current."""
        try:
            call_token = _active_call.set(self)
            span_token = otel_context.attach(trace.set_span_in_context(self.span)) if self.owns_span else None
            return call_token, span_token
        except Exception as error:  # noqa: BLE001
            record_drop("context_failed", error)
            return None, None

    def exit(self, tokens: tuple[Any, Any]) -> None:
        call_token, span_token = tokens
        try:
            if span_token is not None:
                otel_context.detach(span_token)
            if call_token is not None:
                _active_call.reset(call_token)
        except Exception as error:  # noqa: BLE001
            record_drop("context_failed", error)

    @staticmethod
    def is_field_rejection(error: BaseException) -> bool:
        """Whether the endpoint refused the augmented request as invalid (then it is resent plain)."""
        try:
            return (getattr(error, "status_code", None) in _REJECTION_STATUS_CODES
                    and getattr(error, "response", None) is not None)
        except Exception:  # noqa: BLE001 - when unsure, do not resend
            return False

    def remember_rejection(self) -> None:
        """The plain request went through where the augmented one did not: the fields were the
        problem, so this endpoint is not asked for them again (a bad request of the caller's own
        fails both ways, raises the plain request's error, and is not remembered)."""
        _State.rejecting_base_urls.add(self.base_url)
        self.unavailable_reason = REASON_REJECTED

    def fail(self, error: BaseException) -> None:
        """The call raised: close our own span as an error (another instrumentation's is its own)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.owns_span:
                self.span.set_attribute("error.type", type(error).__qualname__)
                self.span.set_status(Status(StatusCode.ERROR, str(error)))
                self.span.end()
        except Exception as failure:  # noqa: BLE001
            record_drop("span_update_failed", failure)

    def finish(self, result: Any, is_async: bool) -> Any:
        """Record the response on the span (or wrap the stream to do so at its end). Never raises."""
        try:
            if self.unavailable_reason == REASON_RAW or (not self.stream and not hasattr(result, "choices")):
                self.close(Capture(unavailable_reason=self.unavailable_reason or REASON_NOT_IN_RESPONSE))
                return result
            if self.stream:
                return wrap_stream(result, self, is_async)
            self.close(capture_response(result), response=result)
        except Exception as error:  # noqa: BLE001
            record_drop("capture_failed", error)
            self.close(Capture(unavailable_reason=REASON_ERROR))
        return result

    def close(self, capture: Capture, response: Any = None, accumulator: StreamAccumulator | None = None) -> None:
        """Write the capture onto the span; end our own span. Once only; never raises."""
        if self.closed:
            return
        self.closed = True
        try:
            header_version = env.parse_int(self.policy_header)
            capture.policy_version = header_version if header_version is not None else env.policy_version_from_env()
            if capture.unavailable_reason is None:
                capture.unavailable_reason = self.unavailable_reason or REASON_NOT_IN_RESPONSE
            attributes = capture.attributes()
            if self.owns_span and response is not None:
                attributes.update(genai_span.response_attributes(response, self.with_content))
            elif self.owns_span and accumulator is not None:
                attributes.update(genai_span.stream_attributes(accumulator, self.with_content))
            self.span.set_attributes(attributes)
        except Exception as error:  # noqa: BLE001
            record_drop("span_update_failed", error)
        finally:
            if self.owns_span:
                try:
                    self.span.end()
                except Exception as error:  # noqa: BLE001
                    record_drop("span_update_failed", error)
