"""OTLP/gRPC receiver: ``TraceService/Export`` and ``LogsService/Export`` on a grpcio
server, plus tracetrain's ``FeedbackService/AddReward`` (proto/tracetrain/v1/feedback.proto).

Status codes follow the OTLP specification (shared/notes/contracts.md §1):
bad data -> ``INVALID_ARGUMENT`` (never retried); back-pressure -> ``UNAVAILABLE``
with ``google.rpc.RetryInfo`` (retried after the delay); too large ->
``RESOURCE_EXHAUSTED`` without RetryInfo (not retried); a missing or wrong bearer
token -> ``UNAUTHENTICATED``. The request bytes are parsed by us, not by grpcio,
so parse errors become clear messages instead of a generic internal error.
``AddReward`` adds ``NOT_FOUND`` (unknown episode) and ``ALREADY_EXISTS`` (reward id
reused for another reward).
"""

from __future__ import annotations

import hmac
import logging
from concurrent import futures

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tracetrain.collector import feedback_proto, log_rows
from tracetrain.collector.errors import PayloadTooLargeError, PermanentError, RetryableError
from tracetrain.collector.feedback import FeedbackService, RewardConflictError, UnknownEpisodeError
from tracetrain.collector.ingest import IngestPipeline

logger = logging.getLogger(__name__)
EXPORT_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
LOGS_SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"


def _retry_status(message: str, retry_after_s: float) -> grpc.Status:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[detail]))


class GrpcReceiver:
    """Serves OTLP/gRPC trace export on ``endpoint`` (``host:port``)."""

    def __init__(
        self,
        pipeline: IngestPipeline,
        endpoint: str,
        auth_token: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        # Few threads on purpose: a queued RPC's body stays in gRPC's flow-controlled
        # buffers instead of Python memory (measured: 32 threads -> 580 MB RSS under
        # overload, 10 -> 443 MB, same throughput).
        max_workers: int = 10,
        feedback: FeedbackService | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.auth_token = auth_token
        self.feedback = feedback
        max_len = pipeline.max_request_bytes + (1 << 20)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tracetrain-grpc"),
            options=[
                ("grpc.max_receive_message_length", max_len),
                ("grpc.max_send_message_length", 4 << 20),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=max_workers * 8,
        )
        handler = grpc.method_handlers_generic_handler(
            EXPORT_SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=None,  # raw bytes: we parse (and report errors) ourselves
                    response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
                )
            },
        )
        logs_handler = grpc.method_handlers_generic_handler(LOGS_SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(
                self._export_logs, request_deserializer=None,
                response_serializer=logs_service_pb2.ExportLogsServiceResponse.SerializeToString)})
        handlers = [handler, logs_handler]
        if feedback is not None:
            handlers.append(grpc.method_handlers_generic_handler(feedback_proto.SERVICE, {
                "AddReward": grpc.unary_unary_rpc_method_handler(
                    self._add_reward, request_deserializer=None,
                    response_serializer=feedback_proto.AddRewardResponse.SerializeToString)}))
        self.server.add_generic_rpc_handlers(tuple(handlers))
        try:
            self.port = self._bind(endpoint, tls_cert_file, tls_key_file)
        except RuntimeError as exc:  # grpcio reports a taken port as RuntimeError
            raise OSError(f"cannot listen on {endpoint} for OTLP/gRPC: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {endpoint} for OTLP/gRPC")

    def _bind(self, endpoint: str, tls_cert_file: str | None, tls_key_file: str | None) -> int:
        if tls_cert_file and tls_key_file:
            with open(tls_key_file, "rb") as f:
                key = f.read()
            with open(tls_cert_file, "rb") as f:
                cert = f.read()
            return self.server.add_secure_port(endpoint, grpc.ssl_server_credentials([(key, cert)]))
        return self.server.add_insecure_port(endpoint)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: float = 10.0) -> None:
        self.server.stop(grace_s).wait()

    def _authorized(self, context: grpc.ServicerContext) -> bool:
        if self.auth_token is None:
            return True
        for key, value in context.invocation_metadata():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.auth_token)
        return False

    def _export(self, body: bytes, context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        if not self._authorized(context):
            self.pipeline.count_unauthenticated("grpc")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            result = self.pipeline.export(body, "grpc", peer=context.peer())
        except PayloadTooLargeError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except PermanentError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RetryableError as exc:
            context.abort_with_status(_retry_status(str(exc), exc.retry_after_s))
        except Exception:  # never a stack trace to the client, always a log line here
            logger.exception("unexpected error in OTLP/gRPC export")
            context.abort_with_status(_retry_status("internal error; retry later", 2.0))
        response = trace_service_pb2.ExportTraceServiceResponse()
        if result.rejected_spans or result.error_message:
            response.partial_success.rejected_spans = result.rejected_spans
            response.partial_success.error_message = result.error_message
        return response

    def _call(self, context: grpc.ServicerContext, what: str, function, *args):
        """Run ``function`` with the OTLP error mapping; aborts the call on failure."""
        if not self._authorized(context):
            self.pipeline.count_unauthenticated("grpc")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            return function(*args)
        except PayloadTooLargeError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except PermanentError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownEpisodeError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except RewardConflictError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except RetryableError as exc:
            context.abort_with_status(_retry_status(str(exc), exc.retry_after_s))
        except Exception:
            logger.exception("unexpected error in gRPC %s", what)
            context.abort_with_status(_retry_status("internal error; retry later", 2.0))

    def _export_logs(self, body: bytes, context: grpc.ServicerContext) -> logs_service_pb2.ExportLogsServiceResponse:
        result = self._call(context, "logs export", self.pipeline.export_logs, body, "grpc_logs",
                            log_rows.parse_protobuf, context.peer())
        response = logs_service_pb2.ExportLogsServiceResponse()
        if result.rejected_spans or result.error_message:
            response.partial_success.rejected_log_records = result.rejected_spans
            response.partial_success.error_message = result.error_message
        return response

    def _add_reward(self, body: bytes, context: grpc.ServicerContext):
        result = self._call(context, "AddReward", self._reward_from_bytes, body, context.peer())
        return feedback_proto.AddRewardResponse(
            accepted=result.accepted, duplicate=result.duplicate, reward_id=result.reward_id)

    def _reward_from_bytes(self, body: bytes, peer: str):
        try:
            request = feedback_proto.AddRewardRequest.FromString(body)
        except Exception as exc:  # DecodeError and friends
            raise PermanentError(f"malformed AddRewardRequest: {exc}") from None
        if not request.HasField("value"):
            raise PermanentError("value is required")
        attributes = json_format.MessageToDict(request.attributes) if request.HasField("attributes") else None
        return self.feedback.add_reward(request.episode_id, request.value, request.name or None,
                                        request.reward_id or None, attributes, request.time_unix_nano or None,
                                        "grpc_feedback", peer)
