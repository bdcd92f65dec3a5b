"""A real OTLP/HTTP trace receiver for tests: a tiny HTTP server on 127.0.0.1 in a background thread.

    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint       # exporters POST to {endpoint}/v1/traces
        ...
        spans = receiver.wait_for_spans(1)

It accepts ``POST /v1/traces`` with protobuf (``application/x-protobuf``) or OTLP/JSON (``application/json``)
bodies, gzip-compressed or not, and records each span with its resource attributes. With ``grpc=True`` it
also serves OTLP/gRPC's TraceService on a second port (``grpc_endpoint``), recording into the same list.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = ["OtlpReceiver", "ReceivedSpan"]

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True, kw_only=True)
class ReceivedSpan:
    """One span as the receiver got it; ids are lowercase hex, ``parent_span_id`` is "" for a root."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # INTERNAL, SERVER, CLIENT, ...
    status: str  # UNSET, OK, ERROR
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


class OtlpReceiver:
    """The receiver; a context manager that starts the server on a free port and stops it on exit."""

    def __init__(self, *, grpc: bool = False) -> None:
        self._spans: list[ReceivedSpan] = []
        self._grpc_enabled = grpc
        self._grpc_server: Any = None
        self._grpc_port = 0
        self._changed = threading.Condition()
        self.requests = 0  # export requests accepted
        self.rejected = 0  # requests that could not be decoded
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL, for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def grpc_endpoint(self) -> str:
        """The OTLP/gRPC endpoint, for ``OTEL_EXPORTER_OTLP_ENDPOINT`` with protocol ``grpc``."""
        if not self._grpc_port:
            raise RuntimeError("this receiver was not started with grpc=True")
        return f"http://127.0.0.1:{self._grpc_port}"

    @property
    def traces_url(self) -> str:
        """The full traces URL, for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``."""
        return f"{self.endpoint}/v1/traces"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A copy of every span received so far."""
        with self._changed:
            return list(self._spans)

    def wait_for_spans(
        self,
        count: int = 1,
        *,
        timeout: float = 10.0,
        where: Callable[[ReceivedSpan], bool] | None = None,
    ) -> list[ReceivedSpan]:
        """Wait until ``count`` spans (matching ``where``) arrived; returns them, or those seen by timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [s for s in self._spans if where is None or where(s)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._changed.wait(remaining)

    def start(self) -> OtlpReceiver:
        """Start serving in the background thread (and the gRPC server's)."""
        self._thread.start()
        if self._grpc_enabled:
            self._start_grpc()
        return self

    def stop(self) -> None:
        """Stop serving and close the sockets."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait(5)
            self._grpc_server = None
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- request handling (runs in the server's threads) --------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.split("?", 1)[0] != "/v1/traces":
            self._reply(handler, 404, b"", "text/plain")
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        encoding = (handler.headers.get("Content-Encoding") or "").lower()
        content_type = (handler.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            if content_type == "application/json":
                spans = _spans_from_json(json.loads(body))
            else:
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                spans = _spans_from_proto(message)
        except Exception as exc:  # a malformed export is the exporter's bug: count it, answer 400
            with self._changed:
                self.rejected += 1
            self._reply(handler, 400, str(exc).encode(), "text/plain")
            return
        self._record(spans)
        if content_type == "application/json":
            self._reply(handler, 200, b"{}", "application/json")
        else:
            reply = ExportTraceServiceResponse().SerializeToString()
            self._reply(handler, 200, reply, "application/x-protobuf")

    def _record(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.requests += 1
            self._changed.notify_all()

    def _start_grpc(self) -> None:
        import grpc  # type: ignore[import-untyped]
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
                receiver._record(_spans_from_proto(request))
                return ExportTraceServiceResponse()

        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
        self._grpc_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc_server = server

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


# --- protobuf ----------------------------------------------------------------------------------------------


def _proto_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _proto_attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _proto_attributes(items: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    item: KeyValue
    for item in items:
        result[item.key] = _proto_value(item.value)
    return result


def _spans_from_proto(message: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in message.resource_spans:
        resource = _proto_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            span: Span
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=_KINDS.get(span.kind, str(span.kind)),
                        status=_STATUS.get(span.status.code, str(span.status.code))
                        if span.HasField("status")
                        else _STATUS[Status.STATUS_CODE_UNSET],
                        attributes=_proto_attributes(span.attributes),
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


# --- OTLP/JSON (ids are hex, enums are integers, 64-bit ints may be strings) ---


def _json_value(value: dict[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "arrayValue" in value:
        return [_json_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _json_attributes(value["kvlistValue"].get("values", []))
    return None


def _json_attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _json_value(item.get("value", {})) for item in items}


def _json_enum(value: Any, names: dict[int, str], prefix: str) -> str:
    if isinstance(value, str):
        return value.removeprefix(prefix)
    return names.get(int(value or 0), str(value))


def _spans_from_json(data: dict[str, Any]) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in data.get("resourceSpans", []):
        resource = _json_attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            scope = scope_spans.get("scope", {}).get("name", "")
            for span in scope_spans.get("spans", []):
                spans.append(
                    ReceivedSpan(
                        name=span["name"],
                        trace_id=span["traceId"].lower(),
                        span_id=span["spanId"].lower(),
                        parent_span_id=span.get("parentSpanId", "").lower(),
                        kind=_json_enum(span.get("kind", 0), _KINDS, "SPAN_KIND_"),
                        status=_json_enum(span.get("status", {}).get("code", 0), _STATUS, "STATUS_CODE_"),
                        attributes=_json_attributes(span.get("attributes", [])),
                        resource=resource,
                        scope=scope,
                    )
                )
    return spans
