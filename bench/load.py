"""Load and soak: hold a steady concurrent load on a server and report what it did.

Reports requests served, errors by status, p50/p99 latency, pairs/s, tokens/s
and the server's memory (front end + workers, RSS) at the start and the end.
With several --config values it starts one server per configuration and runs
the same load against each, side by side, and prints their ratios.

Every request is new (its query carries a serial number), so that the score
cache answers nothing, unless --repeat-fraction asks for repeats: exactly that
share of the requests, spread evenly over the run, is a request already sent,
chosen at random (the same question asked again: pagination, retries, several
users), so that share of the pairs repeats.

    # soak an existing server for 10 minutes
    python -m bench.load --target localhost:50051 --duration 600
    # batching on vs off, on the tiny demo model
    python -m bench.load --model models/demo --duration 20 \\
        --config "batched:" --config "unbatched:--max-batch-size 1"
    # the score cache on vs off, when 30% of the pairs repeat
    python -m bench.load --model models/demo --duration 20 --repeat-fraction 0.3 \\
        --config "cache:" --config "no-cache:--score-cache-bytes 0"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shlex
import statistics
import sys
import time

import grpc

from bench.common import percentile, synthetic_requests
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc


def rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as kids:
                pending += [int(kid) for kid in kids.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total


async def run_load(
    target: str,
    duration: float,
    concurrency: int,
    documents: int,
    timeout: float,
    mean_words: int,
    repeat_fraction: float = 0.0,
) -> dict:
    workload = synthetic_requests(256, documents, seed=1, mean_words=mean_words)
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    pairs = tokens = cached = 0
    stop_at = time.monotonic() + duration
    sent: list[tuple[str, list[str]]] = []
    choose = random.Random(2)

    def next_request(number: int) -> tuple[str, list[str]]:
        """Request `number`: a repeat of one already sent (chosen at random) for exactly
        `repeat_fraction` of the numbers, spread evenly; else a new one."""
        if sent and int((number + 1) * repeat_fraction) > int(number * repeat_fraction):
            return choose.choice(sent)
        query, docs = workload[number % len(workload)]
        request = (f"{query} #{number}", docs)
        sent.append(request)
        return request

    async with grpc.aio.insecure_channel(target) as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)

        serial = iter(range(1 << 62))

        async def client() -> None:
            nonlocal pairs, tokens, cached
            while time.monotonic() < stop_at:
                query, docs = next_request(next(serial))
                start = time.perf_counter()
                try:
                    response = await stub.Rerank(pb.RerankRequest(query=query, documents=docs), timeout=timeout)
                    statuses["OK"] += 1
                    pairs += response.usage.documents
                    tokens += response.usage.tokens
                    cached += response.usage.cached_documents
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError as error:
                    statuses[error.code().name] += 1

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began

    def p_ms(p: float) -> float:
        return round(1000 * percentile(latencies, p), 1) if latencies else float("nan")

    return {
        "seconds": round(elapsed, 1),
        "requests": sum(statuses.values()),
        "by_status": dict(statuses),
        "requests_per_s": round(statuses["OK"] / elapsed, 2),
        "pairs_per_s": round(pairs / elapsed, 1),
        "cached_fraction": round(cached / pairs, 3) if pairs else 0.0,
        "tokens_per_s": round(tokens / elapsed),
        "p50_ms": p_ms(50),
        "p99_ms": p_ms(99),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else float("nan"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="", help="an already running server (host:port)")
    parser.add_argument("--pid", type=int, default=0, help="with --target: the server's pid, to report its memory")
    parser.add_argument("--model", default="", help="start a server on this model (one per --config)")
    parser.add_argument("--config", action="append", default=[], help='"name:extra serve flags"; repeat to compare')
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--documents", type=int, default=20, help="documents per request")
    parser.add_argument("--mean-words", type=int, default=100)
    parser.add_argument(
        "--repeat-fraction", type=float, default=0.0, help="share of requests that repeat one already sent"
    )
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    def load(target):
        return asyncio.run(
            run_load(
                target,
                args.duration,
                args.concurrency,
                args.documents,
                args.timeout,
                args.mean_words,
                args.repeat_fraction,
            )
        )

    settings = ("duration", "concurrency", "documents", "mean_words", "repeat_fraction")
    report: dict = {"load": {k: getattr(args, k) for k in settings}}
    if args.target:
        before = rss_bytes(args.pid) if args.pid else 0
        report["target"] = load(args.target)
        if args.pid:
            report["target"]["rss_mib_start"] = round(before / 2**20)
            report["target"]["rss_mib_end"] = round(rss_bytes(args.pid) / 2**20)
    else:
        from bench.server import start_server

        for config in args.config or ["default:"]:
            name, _, flags = config.partition(":")
            server = start_server(args.model, *shlex.split(flags))
            try:
                before = rss_bytes(server.process.pid)
                figures = load(server.address)
                figures["rss_mib_start"] = round(before / 2**20)
                figures["rss_mib_end"] = round(rss_bytes(server.process.pid) / 2**20)
                figures["flags"] = flags
                report[name] = figures
            finally:
                server.stop()
        names = [c.partition(":")[0] for c in args.config]
        if len(names) > 1:
            first = report[names[0]]["pairs_per_s"] or float("nan")
            report["pairs_per_s_ratio_to_" + names[0]] = {
                n: round(report[n]["pairs_per_s"] / first, 2) for n in names[1:]
            }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main(sys.argv[1:])
