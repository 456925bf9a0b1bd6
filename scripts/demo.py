"""`make demo`: serve the tiny demo model, and once it answers, print a first
call that can be pasted into another terminal.

The server's own `ready` log line says the same, but among other log lines;
this waits for the gRPC health check to answer SERVING, prints the call, and
then stays attached to the server (Ctrl-C stops it, as `reranker serve` would).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

FIRST_CALL = """
The demo server is ready on port {port}. In another terminal, try:

  .venv/bin/reranker rerank --target localhost:{port} --query "what is the capital of France?" \\
      --doc "Paris is the capital of France." --doc "Berlin is the capital of Germany."

(Random weights: the scores are meaningless but computed exactly as for the real models.)
More: README.md, "A first call". Ctrl-C stops the server.
"""


def wait_serving(port: int, server: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to load")
    args, serve_flags = parser.parse_known_args(argv)
    command = [sys.executable, "-m", "service", "serve", "--model", args.model, "--port", str(args.port), *serve_flags]
    server = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        if wait_serving(args.port, server, args.timeout):
            print(FIRST_CALL.format(port=args.port), flush=True)
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server too (same process group): let it drain
        return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
