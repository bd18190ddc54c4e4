"""Overload: refuse with retryable codes (UNAVAILABLE + RetryInfo, 503 + Retry-After), never drop."""

from __future__ import annotations

import http.client
import threading

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import make_collector
from tests.integration.spanfactory import EXPORT_METHOD, make_request
from tracetrain.collector.reader import query


def test_full_queue_refuses_with_retry_hints_and_loses_nothing(data_dir):
    first_body, first_keys = make_request(5)
    # Room for exactly one such request in flight.
    daemon = make_collector(data_dir, max_pending_bytes=len(first_body) + 1)
    gate = threading.Event()
    entered = threading.Event()
    original = daemon.writer._write_partitions

    def slow_write(items):
        entered.set()
        gate.wait(30)
        return original(items)

    daemon.writer._write_partitions = slow_write
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}")
    export = channel.unary_unary(EXPORT_METHOD)
    try:
        first_result: list = []
        first = threading.Thread(target=lambda: first_result.append(export(first_body, timeout=30)))
        first.start()
        assert entered.wait(10)
        # The first request's bytes are in flight: the next one is over the budget.
        second_body, _ = make_request(5)
        try:
            export(second_body, timeout=10)
            raise AssertionError("expected UNAVAILABLE")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(exc)
            retry = error_details_pb2.RetryInfo()
            assert status is not None and status.details[0].Unpack(retry)
            assert retry.retry_delay.ToNanoseconds() > 0
        conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
        conn.request("POST", "/v1/traces", body=second_body, headers={"Content-Type": "application/x-protobuf"})
        response = conn.getresponse()
        assert response.status == 503 and int(response.getheader("Retry-After")) >= 1
        response.read()
        gate.set()
        first.join(30)
        assert len(first_result) == 1
        metrics = daemon.metrics
        assert metrics.requests.labels("grpc", "refused")._value.get() == 1
        assert metrics.requests.labels("http", "refused")._value.get() == 1
        # Capacity is back once the commit finished.
        export(second_body, timeout=10)
    finally:
        gate.set()
        channel.close()
        daemon.stop()
    stored = set(query(data_dir, "SELECT trace_id || span_id AS k FROM spans").column("k").to_pylist())
    assert set(first_keys) <= stored and len(stored) == 10


def test_storage_failure_is_retryable_not_lost(data_dir):
    daemon = make_collector(data_dir)

    def broken(items):
        raise OSError(28, "No space left on device")

    original = daemon.writer._write_partitions
    daemon.writer._write_partitions = broken
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}")
    export = channel.unary_unary(EXPORT_METHOD)
    try:
        body, keys = make_request(3)
        try:
            export(body, timeout=10)
            raise AssertionError("expected UNAVAILABLE")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "storage error" in exc.details()
        daemon.writer._write_partitions = original
        export(body, timeout=10)  # the client's retry succeeds
    finally:
        channel.close()
        daemon.stop()
    assert query(data_dir, "SELECT count(*) AS n FROM spans").column("n").to_pylist() == [3]
