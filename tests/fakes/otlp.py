"""A local OTLP trace receiver (HTTP/protobuf and gRPC) that decodes the real ExportTraceServiceRequest."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def decode(payload: bytes, headers: dict[str, str] | None = None) -> list[ReceivedSpan]:
    """Every span of one ExportTraceServiceRequest, with its resource's attributes."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    req.ParseFromString(payload)
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        status_code=s.status.code,
                        status_message=s.status.message,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        resource=resource,
                        headers=dict(headers or {}),
                    )
                )
    return out


class _Spans:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.spans: list[ReceivedSpan] = []
        self.requests = 0

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self.requests += 1
            self.spans.extend(spans)
            self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[ReceivedSpan]:
        """The received spans for which predicate is true, once there is at least one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [s for s in self.spans if predicate(s)]
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching span in {len(self.spans)} received")
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self.spans.clear()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    received: _Spans


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        encoding = (self.headers.get("content-encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path != "/v1/traces" or "protobuf" not in (self.headers.get("content-type") or ""):
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.received.add(decode(body, headers))
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: _Spans) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        headers = {k: v for k, v in context.invocation_metadata()}
        self.received.add(decode(request.SerializeToString(), headers))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """protocol "http/protobuf" (POST /v1/traces) or "grpc" (TraceService/Export), on loopback."""

    def __init__(self, protocol: str = "http/protobuf", port: int = 0) -> None:
        self.protocol = protocol
        self.received = _Spans()
        self._port = port
        self._http: _HttpServer | None = None
        self._grpc: grpc.Server | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> OtlpReceiver:
        if self.protocol == "grpc":
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
                _TraceService(self.received), server
            )
            self._port = server.add_insecure_port(f"127.0.0.1:{self._port}")
            server.start()
            self._grpc = server
        else:
            http = _HttpServer(("127.0.0.1", self._port), _Handler)
            http.received = self.received
            self._port = http.server_address[1]
            threading.Thread(target=http.serve_forever, daemon=True).start()
            self._http = http
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait()
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[ReceivedSpan]:
        return self.received.wait_for(predicate, timeout)

    @property
    def spans(self) -> list[ReceivedSpan]:
        return list(self.received.spans)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
