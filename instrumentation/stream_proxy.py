"""Transparent proxies over the OpenAI client's ``Stream`` / ``AsyncStream``.

The caller iterates the proxy exactly as it would the stream: same chunk objects,
same order, same exceptions, and ``isinstance(proxy, openai.Stream)`` still holds
(wrapt proxies ``__class__``), so outer instrumentations and frameworks that check
the type keep working. On the side, each chunk goes into a StreamAccumulator; when
the stream ends (exhausted, closed, left through ``with``, failed, or garbage
collected unfinished) the call's span gets the accumulated ids once.
"""

from __future__ import annotations

from typing import Any, Protocol

import wrapt

from tracetrain.instrumentation.drops import record_drop
from tracetrain.instrumentation.token_capture import REASON_ERROR, Capture, StreamAccumulator


class StreamOwner(Protocol):
    """What a proxy reports to: the LLM call in flight (openai_capture._LlmCall)."""

    with_content: bool

    def close(self, capture: Capture, response: Any = None, accumulator: StreamAccumulator | None = None) -> None: ...

    def fail(self, error: BaseException) -> None: ...


def wrap_stream(stream: Any, owner: StreamOwner, is_async: bool) -> Any:
    """A proxy over ``stream`` reporting to ``owner``; ``stream`` itself if it is no stream."""
    if is_async and hasattr(stream, "__anext__"):
        return AsyncStreamProxy(stream, owner)
    if not is_async and hasattr(stream, "__next__"):
        return SyncStreamProxy(stream, owner)
    owner.close(Capture(unavailable_reason=REASON_ERROR))
    record_drop("unknown_stream_type")
    return stream


class _StreamProxyBase(wrapt.ObjectProxy):
    """Shared bookkeeping; wrapt keeps ``_self_*`` attributes on the proxy, not the stream."""

    def __init__(self, stream: Any, owner: StreamOwner):
        super().__init__(stream)
        self._self_owner = owner
        self._self_accumulator = StreamAccumulator(keep_messages=owner.with_content)
        self._self_done = False
        self._self_broken = False

    def _self_add(self, chunk: Any) -> None:
        if self._self_broken:
            return
        try:
            self._self_accumulator.add(chunk)
        except Exception as error:  # noqa: BLE001 - a chunk we cannot read must not reach the caller
            self._self_broken = True  # ids with a chunk missing would be wrong ids: record none
            record_drop("stream_chunk_failed", error)

    def _self_finish(self, error: BaseException | None = None) -> None:
        if self._self_done:
            return
        self._self_done = True
        try:
            if error is not None:
                self._self_owner.fail(error)
            elif self._self_broken:
                self._self_owner.close(Capture(unavailable_reason=REASON_ERROR))
            else:
                accumulator = self._self_accumulator
                self._self_owner.close(accumulator.capture(), accumulator=accumulator)
        except Exception as failure:  # noqa: BLE001
            record_drop("stream_finish_failed", failure)

    def __del__(self):  # an abandoned stream still ends its span
        try:
            self._self_finish()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


class SyncStreamProxy(_StreamProxyBase):
    """Proxy over ``openai.Stream``."""

    def __iter__(self):
        return self

    def __next__(self):
        try:
            chunk = self.__wrapped__.__next__()
        except StopIteration:
            self._self_finish()
            raise
        except BaseException as error:
            self._self_finish(error)
            raise
        self._self_add(chunk)
        return chunk

    def __enter__(self):
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return self.__wrapped__.__exit__(exc_type, exc_value, traceback)
        finally:
            self._self_finish()

    def close(self):
        try:
            return self.__wrapped__.close()
        finally:
            self._self_finish()


class AsyncStreamProxy(_StreamProxyBase):
    """Proxy over ``openai.AsyncStream``."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            chunk = await self.__wrapped__.__anext__()
        except StopAsyncIteration:
            self._self_finish()
            raise
        except BaseException as error:
            self._self_finish(error)
            raise
        self._self_add(chunk)
        return chunk

    async def __aenter__(self):
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc_value, traceback):
        try:
            return await self.__wrapped__.__aexit__(exc_type, exc_value, traceback)
        finally:
            self._self_finish()

    async def close(self):
        try:
            return await self.__wrapped__.close()
        finally:
            self._self_finish()
