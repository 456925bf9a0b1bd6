"""`python -m bench.bare_grpc`: the floor under the front end's cost per call.

A grpc.aio server (the same grpcio, the same generated servicer base, health
checking) whose Reranker answers at once: a Score call gets one result, a
Rerank call one result per document, with no interceptor, validation,
tokenizing, batching, worker or log line. bench/frontend.py (`--floor`) drives
it with the same calls as the real server, so that what the front end spends
per call can be read against what grpc.aio itself spends. Benchmark-only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc


class AnswerAtOnce(reranker_pb2_grpc.RerankerServicer):
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        results = [pb.ScoredDocument(index=i, logit=0.0, score=0.5) for i in range(len(request.pairs))]
        return pb.ScoreResponse(request_id=request.request_id, results=results)

    async def Rerank(self, request: pb.RerankRequest, context) -> pb.RerankResponse:
        results = [pb.ScoredDocument(index=i, logit=0.0, score=0.5) for i in range(len(request.documents))]
        return pb.RerankResponse(request_id=request.request_id, results=results)


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    reranker_pb2_grpc.add_RerankerServicer_to_server(AnswerAtOnce(), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stopping = asyncio.get_running_loop()
    stopping.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop(0)))
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"event": "listening", "port": bound}), flush=True)  # what bench.server waits for
    await server.wait_for_termination()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_grpc")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    known, _ = parser.parse_known_args(argv)  # bench.server passes the real server's flags too
    asyncio.run(serve(known.host, known.port))


if __name__ == "__main__":
    main(sys.argv[1:])
