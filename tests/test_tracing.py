"""Tracing: with an OTLP endpoint set, each request arrives at the collector as a
span in the caller's trace, with tokenize, queue and batch children."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC endpoint that keeps what it receives."""

    def __init__(self) -> None:
        self.spans = []
        self.arrived = threading.Event()

    def Export(self, request, context):
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_request_spans_reach_the_collector(tiny_model, server_factory):
    collector = Collector()
    otlp = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)
    port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    try:
        server = server_factory(
            tiny_model,
            "--workers-per-device",
            "1",
            "--max-batch-size",
            "4",
            "--otlp-endpoint",
            f"http://127.0.0.1:{port}",
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
        )
        with server.channel() as channel:
            reranker_pb2_grpc.RerankerStub(channel).Rerank(
                pb.RerankRequest(query="q", documents=[f"doc {i}" for i in range(10)], request_id="traced"),
                timeout=30,
                metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),),
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(collector.spans) < 5:
            collector.arrived.wait(1)
            collector.arrived.clear()
    finally:
        otlp.stop(0)
    by_name = {}
    for span in collector.spans:
        by_name.setdefault(span.name, []).append(span)
    (request,) = by_name["Rerank"]
    assert request.trace_id.hex() == TRACE_ID and request.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["reranker.request_id"].string_value == "traced"
    assert attributes["reranker.documents"].int_value == 10
    children = [s for s in collector.spans if s.parent_span_id == request.span_id]
    assert sorted({s.name for s in children}) == ["batch", "queue", "tokenize"]
    batches = by_name["batch"]
    assert len(batches) == 3  # 10 pairs, 4 rows per batch
    assert sum({a.key: a.value for a in b.attributes}["reranker.rows_of_this_request"].int_value for b in batches) == 10
    for span in children:
        assert (
            request.start_time_unix_nano
            <= span.start_time_unix_nano
            <= span.end_time_unix_nano
            <= request.end_time_unix_nano
        )
