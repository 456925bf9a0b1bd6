"""HTTP/JSON against gRPC on one server, the same workload, in one run.

    python -m bench.http_vs_grpc [--model DIR] [--workload b] [--requests 256] [--rounds 3] [--json FILE]

One real server (`python -m service serve`, one CPU worker) answers both ports.
The workload's requests go through each transport in turn, `clients` at a time
(grpc.aio stubs; aiohttp with one keep-alive connection per client: the
lightest well-kept asyncio HTTP client, as grpc.aio's client is mostly C), for
`rounds` alternating rounds after a warm-up. For each transport it reports
pairs/s and latency (the median round, and the range over rounds), and the
front-end process's CPU seconds per request: utime + stime of the server
process alone (not its workers), from /proc/<pid>/stat before and after each
round; and the clients' CPU seconds per request (this process). Both
transports must return the same logits for the same request (up to batch
composition, which differs between runs).

Without --model it builds the tiny random-weight model (real tokenizer), whose
compute is small: the transports' costs then weigh the most. The clients run
in this process, on the same machine: their CPU is the machine's too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from tokenizers import Tokenizer

from bench import workloads
from bench.common import Stopwatch, cpu_seconds, percentile
from bench.contenders import Run, drive
from bench.server import start_server

TIMEOUT_S = 300.0
TRANSPORTS = ("grpc", "http")


async def drive_http(url: str, requests: Sequence[workloads.Request], clients: int) -> Run:
    """bench.contenders.drive's clients, over HTTP: each sends its next request when
    the previous one is answered."""
    run = Run(scores=[[] for _ in requests], latencies=[0.0] * len(requests))
    pending = iter(range(len(requests)))
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for index in pending:
                request = requests[index]
                body = {"query": request.query, "documents": list(request.documents)}
                with Stopwatch() as watch:
                    async with session.post("/v2/rerank", json=body) as answer:
                        answer.raise_for_status()
                        results = (await answer.json())["results"]
                run.latencies[index] = watch.seconds
                logits = [0.0] * len(request.documents)
                for result in results:
                    logits[result["index"]] = result["logit"]
                run.scores[index] = logits

        await asyncio.gather(*(client() for _ in range(clients)))
    return run


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (the clients), every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_round(server, transport: str, requests, clients: int) -> dict:
    before, own_before = cpu_seconds(server.process.pid), own_cpu_seconds()
    with Stopwatch() as watch:
        if transport == "grpc":
            run = asyncio.run(drive(server.address, requests, clients))
        else:
            run = asyncio.run(drive_http(server.http_url, requests, clients))
    cpu, own = cpu_seconds(server.process.pid) - before, own_cpu_seconds() - own_before
    pairs = sum(len(request.documents) for request in requests)
    return {
        "pairs_per_s": pairs / watch.seconds,
        "p50_ms": 1000 * percentile(run.latencies, 50),
        "p99_ms": 1000 * percentile(run.latencies, 99),
        "front_end_cpu_ms_per_request": 1000 * cpu / len(requests),
        "client_cpu_ms_per_request": 1000 * own / len(requests),
        "logits": run.scores,
    }


def summary(rounds: list[dict]) -> dict:
    report = {}
    for key in ("pairs_per_s", "p50_ms", "p99_ms", "front_end_cpu_ms_per_request", "client_cpu_ms_per_request"):
        values = [measured[key] for measured in rounds]
        report[key] = statistics.median(values)
        report[key + "_range"] = [min(values), max(values)]
    return report


def largest_difference(first: list[list[float]], second: list[list[float]]) -> float:
    return max(abs(a - b) for x, y in zip(first, second, strict=True) for a, b in zip(x, y, strict=True))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint directory (default: the tiny random-weight model)")
    parser.add_argument("--workload", default="b", choices=sorted(workloads.SPECS))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--documents", type=int, default=0, help="documents per request (default: the workload's)")
    parser.add_argument("--clients", type=int, default=0, help="concurrent clients (default: the workload's)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per transport, alternating")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        model = Path(args.model) if args.model else _tiny_model(Path(scratch))
        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        workload = workloads.build(
            args.workload, tokenizer, requests=args.requests, clients=args.clients, documents=args.documents
        )
        # The score cache off: every round's requests repeat, and the transports are what is measured.
        server = start_server(model, "--workers-per-device", "1", "--cpu-threads", "1", "--score-cache-bytes", "0")
        try:
            warm_up = workload.requests[: 2 * workload.clients]
            for transport in TRANSPORTS:
                one_round(server, transport, warm_up, workload.clients)
            rounds: dict[str, list[dict]] = {transport: [] for transport in TRANSPORTS}
            for _ in range(args.rounds):
                for transport in TRANSPORTS:
                    rounds[transport].append(one_round(server, transport, workload.requests, workload.clients))
        finally:
            server.stop()

    report = {
        "workload": args.workload,
        "requests": len(workload.requests),
        "documents_per_request": len(workload.requests[0].documents),
        "clients": workload.clients,
        "rounds": args.rounds,
        "model": str(args.model or "tiny random-weight model"),
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "max_abs_logit_diff": largest_difference(rounds["grpc"][0]["logits"], rounds["http"][0]["logits"]),
    }
    for transport in TRANSPORTS:
        report[transport] = summary(rounds[transport])
    report["http_over_grpc_pairs_per_s"] = report["http"]["pairs_per_s"] / report["grpc"]["pairs_per_s"]
    # None when a run was too short for gRPC's front end to spend one clock tick (a tiny test run).
    grpc_cpu = report["grpc"]["front_end_cpu_ms_per_request"]
    report["http_over_grpc_cpu_per_request"] = (
        report["http"]["front_end_cpu_ms_per_request"] / grpc_cpu if grpc_cpu else None
    )
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _tiny_model(directory: Path) -> Path:
    from workers.demo import build_tiny_model

    return build_tiny_model(directory / "tiny")


if __name__ == "__main__":
    main()
