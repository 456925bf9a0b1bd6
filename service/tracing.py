"""OpenTelemetry tracing, off unless an OTLP endpoint is set.

Each request becomes one span (named for its RPC) with child spans for
tokenization, queueing and every batch that held its pairs. The spans are
written after the request ends, from the timestamps its Job kept, so the
batcher carries no tracing code. A W3C `traceparent` in the call's metadata
makes the request span part of the caller's trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.work import Job


class Tracing:
    def __init__(self, endpoint: str, service_version: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ValueError(
                "otlp_endpoint is set but OpenTelemetry is not installed: pip install 'qwen3-reranker-service[tracing]'"
            ) from None
        from opentelemetry import context, propagate, trace

        self._context, self._propagate, self._trace = context, propagate, trace
        resource = Resource.create({"service.name": "reranker", "service.version": service_version})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://")))
        )
        self._tracer = self._provider.get_tracer("reranker")

    def attach(self, metadata: Iterable[tuple[str, str]] | None) -> Any:
        """Make the caller's trace (if any) the current context; returns a token for `detach`."""
        carrier = {key: value for key, value in metadata or ()}
        return self._context.attach(self._propagate.extract(carrier))

    def detach(self, token: Any) -> None:
        self._context.detach(token)

    def record(
        self,
        name: str,
        request_id: str,
        arrived: float,
        tokenize_seconds: float,
        jobs: Sequence[Job],
        error: BaseException | None,
    ) -> None:
        """Write the spans of one finished request. Times are perf_counter (arrival)
        and event-loop time (the jobs'); both are turned into wall-clock nanoseconds.
        A request usually has one job; none when the score cache answered it all."""
        now_ns, perf_now, loop_now = time.time_ns(), time.perf_counter(), asyncio.get_running_loop().time()

        def perf_to_ns(t: float) -> int:
            return now_ns - int((perf_now - t) * 1e9)

        def loop_to_ns(t: float) -> int:
            return now_ns - int((loop_now - t) * 1e9)

        span = self._tracer.start_span(
            name, start_time=perf_to_ns(arrived), attributes={"reranker.request_id": request_id}
        )
        parent = self._trace.set_span_in_context(span)
        tokenized = perf_to_ns(arrived + tokenize_seconds)
        self._tracer.start_span("tokenize", context=parent, start_time=perf_to_ns(arrived)).end(end_time=tokenized)
        if jobs:
            span.set_attribute("reranker.documents", sum(len(job.pairs) for job in jobs))
            span.set_attribute("reranker.tokens", sum(job.tokens for job in jobs))
            queue = self._tracer.start_span(
                "queue", context=parent, start_time=loop_to_ns(min(job.admitted_at for job in jobs))
            )
            queue.end(end_time=loop_to_ns(max(job.started_at for job in jobs)))
            for batch in (batch for job in jobs for batch in job.batches):
                child = self._tracer.start_span(
                    "batch",
                    context=parent,
                    start_time=loop_to_ns(batch.sent_at),
                    attributes={
                        "reranker.batch_id": batch.batch_id,
                        "reranker.worker": batch.worker,
                        "reranker.batch_rows": batch.rows,
                        "reranker.rows_of_this_request": batch.rows_of_job,
                        "reranker.padded_tokens": batch.padded_tokens,
                        "reranker.compute_seconds": batch.compute_seconds,
                    },
                )
                child.end(end_time=loop_to_ns(batch.done_at))
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(error).__name__))
        span.end(end_time=now_ns)

    def shutdown(self) -> None:
        self._provider.shutdown()  # flushes what is pending
