"""The front end's ceiling: how many pairs one front-end process can take in when
its workers cost nothing, and what it spends per pair.

The server is the real one (`python -m bench.null_server`: gRPC, interceptors,
validation, tokenizing, the batcher, the pool, the worker processes and their
socket) with workers whose scorer does no model work. Concurrent grpc.aio
clients in this process send each call shape for a while after a warm-up:
one-pair `Score` calls, and 50-document `Rerank` calls, with pairs of about
300 tokens (standard-library docstrings, as in bench/workloads.py; every call
has its own query, so that nothing is answered from a cache). Measured per
shape, from /proc: the front-end process's CPU seconds per pair (and so pairs
per front-end CPU second), the workers', all of the service's, and this
client's. CPU seconds per pair carry from this small machine to bigger hosts;
pairs/s here are bounded by the 2 cores the client, the server and the worker share.

With `--profile`, a second pass per shape runs py-spy on the front-end process
and splits its samples (all threads, active only) into where they were taken:
tokenizing, protobuf, gRPC, the interceptors, metrics and logs, the core, the
batcher, the pool and its socket, the event loop. That pass is slowed by the
sampling; its shares are applied to the first pass's CPU per pair.

With `--floor`, the same calls then go to `python -m bench.bare_grpc`, a
grpc.aio server that answers at once, and each shape's front-end CPU per call
is printed against that floor.

    python -m bench.frontend                     # both shapes, 10 s each
    python -m bench.frontend --floor --repeat 3  # and the bare grpc.aio floor, three rounds
    python -m bench.frontend --profile --seconds 15
    python -m bench.frontend --server-args "--tokenizer-processes 2"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from bench import workloads
from bench.common import RESULTS, cpu_seconds, percentile
from bench.server import Server, start_server
from workers.prompt import PromptEncoder

PAIR_TOKENS = (250, 350)  # the pairs' length, prompt included
# Where a py-spy sample was taken: the first rule, from the innermost frame outwards, that a frame matches.
BUCKETS = (
    ("tokenize", ("tokenizers", "workers/prompt.py")),
    ("protobuf", ("google/protobuf", "_pb2", "FromString", "SerializeToString", "upb_", "_upb")),
    ("batcher", ("service/batcher.py", "service/work.py")),
    ("pool and worker socket", ("service/pool.py", "workers/protocol.py")),
    ("interceptors, metrics, logs", ("service/interceptors.py", "service/metrics.py", "prometheus_client",
                                     "service/tracing.py", "structlog", "service/limits.py")),
    ("servicer (gRPC <-> calls)", ("service/servicer.py",)),
    ("core (Ranker)", ("service/ranking.py", "service/calls.py")),
    ("gRPC", ("grpc/", "grpc._cython", "_cython", "cygrpc", "grpc_core", "grpc_", "libgrpc")),
    ("event loop, threads", ("asyncio/", "concurrent/futures", "threading.py", "selectors.py")),
)  # fmt: skip
# A sample whose innermost Python frame is an asyncio callback ran C code that callback called:
# gRPC's Cython layer (and the protobuf parsing it calls), or asyncio's C tasks and futures.
C_CALLBACKS = "C callbacks (gRPC Cython, asyncio C)"


@dataclass(frozen=True)
class Shape:
    name: str
    documents: int  # pairs per call
    clients: int


SHAPES = (Shape("score-1", 1, 32), Shape("rerank-50", 50, 4))


def documents_of_pair_length(tokenizer: Tokenizer) -> list[str]:
    """Docstrings whose pair (prompt and a short query included) is about 300 tokens."""
    encoder = PromptEncoder(tokenizer)
    texts = [doc for _, doc in workloads.short_documents(tokenizer)]
    lengths = [pair.length for pair in encoder.encode([("what does this function do 0", t) for t in texts])]
    low, high = PAIR_TOKENS
    chosen = [text for text, length in zip(texts, lengths, strict=True) if low <= length <= high]
    if len(chosen) < 50:
        raise SystemExit(f"only {len(chosen)} docstrings make pairs of {low}-{high} tokens")
    return chosen


async def drive(
    address: str,
    shape: Shape,
    documents: Sequence[str],
    seconds: float,
    warm_up: float,
    snapshot: Callable[[], dict] = dict,
) -> dict:
    """Send calls of `shape` from `shape.clients` clients: a warm-up of `warm_up` seconds
    and at least one answer, then a measured window of `seconds` and at least one call
    finished inside it (a busy machine may take longer), `snapshot()` taken at its edges."""
    import grpc

    from reranker.v1 import reranker_pb2 as pb
    from reranker.v1 import reranker_pb2_grpc

    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {
        "measuring": False,
        "stop": False,
        "counter": 0,
        "answered": 0,
        "pairs": 0,
        "calls": 0,
        "latencies": [],
    }

    async def client(stub) -> None:
        while not state["stop"]:
            state["counter"] += 1
            number = state["counter"]
            query = f"what does this function do {number}"
            start = loop.time()
            if shape.name.startswith("score"):
                picked = documents[number % len(documents)]
                await stub.Score(pb.ScoreRequest(pairs=[pb.Pair(query=query, document=picked)]), timeout=120)
            else:
                first = number % len(documents)
                chosen = [documents[(first + i) % len(documents)] for i in range(shape.documents)]
                await stub.Rerank(pb.RerankRequest(query=query, documents=chosen), timeout=120)
            state["answered"] += 1
            if state["measuring"]:
                state["pairs"] += shape.documents
                state["calls"] += 1
                state["latencies"].append(loop.time() - start)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        tasks = [asyncio.create_task(client(stub)) for _ in range(shape.clients)]

        async def at_least(duration: float, key: str) -> None:
            """`duration` seconds, then until state[key] counts a call (or every client has failed)."""
            await asyncio.sleep(duration)
            while not state[key] and not all(task.done() for task in tasks):
                await asyncio.sleep(0.05)

        await at_least(warm_up, "answered")
        state["before"] = snapshot()
        state["measuring"] = True
        state["started"] = time.perf_counter()
        await at_least(seconds, "calls")
        state["measuring"] = False
        state["seconds"] = time.perf_counter() - state["started"]
        state["after"] = snapshot()
        state["stop"] = True
        await asyncio.gather(*tasks)
    return state


def measure(server: Server, shape: Shape, documents: Sequence[str], seconds: float, warm_up: float) -> dict:
    """One shape: pairs/s, latency, and CPU seconds per pair of each process."""
    workers = server.worker_pids()
    tokenizers = server.tokenizer_pids()
    front = server.process.pid

    def snapshot() -> dict:
        return {
            "front": cpu_seconds(front),
            "tokenizers": sum(cpu_seconds(pid) for pid in tokenizers),
            "workers": sum(cpu_seconds(pid) for pid in workers),
            "client": time.process_time(),
        }

    state = asyncio.run(drive(server.address, shape, documents, seconds, warm_up, snapshot))
    pairs = state["pairs"]
    spent = {key: state["after"][key] - state["before"][key] for key in ("front", "tokenizers", "workers", "client")}
    latencies = [1000 * s for s in state["latencies"]]
    return {
        "shape": shape.name,
        "clients": shape.clients,
        "calls": state["calls"],
        "pairs": pairs,
        "seconds": round(state["seconds"], 2),
        "pairs_per_s": round(pairs / state["seconds"], 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "front_end_cpu_us_per_pair": round(1e6 * spent["front"] / pairs, 1),
        "pairs_per_front_end_cpu_s": round(pairs / spent["front"]),
        "tokenizers_cpu_us_per_pair": round(1e6 * spent["tokenizers"] / pairs, 1),
        "workers_cpu_us_per_pair": round(1e6 * spent["workers"] / pairs, 1),
        "service_cpu_us_per_pair": round(1e6 * (spent["front"] + spent["tokenizers"] + spent["workers"]) / pairs, 1),
        "client_cpu_us_per_pair": round(1e6 * spent["client"] / pairs, 1),
    }


def profile_front_end(
    server: Server, shape: Shape, documents: Sequence[str], seconds: float, out: pathlib.Path, native: bool
) -> dict[str, dict]:
    """py-spy on the front-end process while `shape` runs; the share of active samples per bucket."""
    py_spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
    raw = out / f"py-spy-{shape.name}.txt"
    recorder = subprocess.Popen(
        [py_spy, "record", "--pid", str(server.process.pid), "--duration", str(int(seconds)), "--rate", "250",
         "--format", "raw", "--output", str(raw), *(["--native"] if native else ["--nonblocking"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    asyncio.run(drive(server.address, shape, documents, seconds + 2, 0.5))
    _, errors = recorder.communicate(timeout=60)
    if recorder.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({recorder.returncode}): {errors.strip()[-300:]}")
    return bucket_shares(raw.read_text())


def bucket_shares(folded: str) -> dict[str, dict]:
    """From py-spy's raw output (one `frame;frame;... count` line per stack,
    outermost first), each bucket's share of the samples and the innermost
    frames that put samples there most often."""
    counts: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = {}
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        bucket = (
            C_CALLBACKS
            if frames[-1].startswith("Handle._run (asyncio/events.py")
            else next(
                (
                    label
                    for frame in reversed(frames)
                    for label, fragments in BUCKETS
                    if any(fragment in frame for fragment in fragments)
                ),
                "other",
            )
        )
        counts[bucket] += int(count)
        leaves.setdefault(bucket, Counter())[frames[-1]] += int(count)
    total = sum(counts.values()) or 1
    return {
        label: {
            "share": counts[label] / total,
            "top_frames": {frame: n / total for frame, n in leaves.get(label, Counter()).most_common(4)},
        }
        for label in (*(label for label, _ in BUCKETS), C_CALLBACKS, "other")
    }


def print_table(report: dict) -> None:
    print(
        f"\nfront end with no-model workers ({report['server_args']}); pairs of "
        f"{report['mean_pair_tokens']:.0f} tokens; load average {report['load_average']}"
    )
    columns = ("clients", "pairs/s", "p50 ms", "p99 ms", "FE µs/pair", "pairs/FE-s", "tok µs/pair", "wrk µs/pair",
               "svc µs/pair", "client µs")  # fmt: skip
    print(f"{'':28}" + "".join(f"{c:>12}" for c in columns))
    for r in report["shapes"]:
        cells = (r["clients"], r["pairs_per_s"], r["p50_ms"], r["p99_ms"], r["front_end_cpu_us_per_pair"],
                 r["pairs_per_front_end_cpu_s"], r["tokenizers_cpu_us_per_pair"], r["workers_cpu_us_per_pair"],
                 r["service_cpu_us_per_pair"], r["client_cpu_us_per_pair"])  # fmt: skip
        name = f"{r['shape']} {r['server']} #{r['round']}"
        print(f"{name:28}" + "".join(f"{c:>12}" for c in cells))
    for shape in dict.fromkeys(r["shape"] for r in report["shapes"]):
        ours = [
            r["front_end_cpu_us_per_pair"]
            for r in report["shapes"]
            if (r["shape"], r["server"]) == (shape, "front end")
        ]
        floor = [
            r["front_end_cpu_us_per_pair"]
            for r in report["shapes"]
            if (r["shape"], r["server"]) == (shape, "bare grpc.aio")
        ]
        if ours and floor:
            print(
                f"{shape}: the front end's CPU per pair is {statistics.median(ours) / statistics.median(floor):.1f}x "
                f"bare grpc.aio's (medians over {len(ours)} rounds)"
            )
    for r in report["shapes"]:
        if "profile" in r:
            per_pair = r["front_end_cpu_us_per_pair"]
            parts = sorted(r["profile"].items(), key=lambda item: -item[1]["share"])
            print(f"\n{r['shape']}: the front end's {per_pair:.0f} µs of CPU per pair, by where py-spy found it")
            for label, found in parts:
                share = found["share"]
                print(f"  {label:32}{100 * share:6.1f}%{share * per_pair:10.1f} µs/pair")
                for frame, part in list(found["top_frames"].items())[:2]:
                    print(f"      {100 * part:5.1f}%  {frame[:100]}")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per shape")
    parser.add_argument("--warm-up", type=float, default=2.0)
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES], choices=[s.name for s in SHAPES])
    parser.add_argument("--profile", action="store_true", help="then a py-spy pass per shape")
    parser.add_argument("--floor", action="store_true", help="also measure a bare grpc.aio server (bench.bare_grpc)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every measurement (the table shows each)")
    parser.add_argument("--native", action="store_true", help="py-spy with native frames (gRPC's C core, Rust)")
    parser.add_argument(
        "--server-args",
        default="--max-batch-tokens 32768",
        help="flags for the server (default: the CUDA batch budget, as a GPU host's front end runs)",
    )
    parser.add_argument("--tokenizer", default="", help="a folder with the Qwen3 tokenizer files")
    parser.add_argument("--json", default=str(RESULTS / "frontend_cpu.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    from workers.demo import build_tiny_model

    args = parse(argv)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as scratch:
        model = build_tiny_model(pathlib.Path(scratch) / "model", tokenizer_dir=args.tokenizer or None)
        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        documents = documents_of_pair_length(tokenizer)
        pairs = PromptEncoder(tokenizer).encode([("what does this function do 0", d) for d in documents])
        lengths = [pair.length for pair in pairs]
        report = {
            "server_args": args.server_args,
            "mean_pair_tokens": sum(lengths) / len(lengths),
            "documents": len(documents),
            "load_average": round(os.getloadavg()[0], 2),
            "cpu_count": os.cpu_count(),
            "shapes": [],
        }
        shapes = [s for s in SHAPES if s.name in args.shapes]
        servers = [("front end", ("bench.null_server",))] + ([("bare grpc.aio", ("bench.bare_grpc",))] * args.floor)
        for round_number in range(1, args.repeat + 1):
            for label, entry in servers:
                server = start_server(model, *shlex.split(args.server_args), entry=entry)
                try:
                    for shape in shapes:
                        print(f"  round {round_number}, {label}, {shape.name} ...", file=sys.stderr, flush=True)
                        result = measure(server, shape, documents, args.seconds, args.warm_up)
                        result |= {"server": label, "round": round_number}
                        if args.profile and label == "front end":
                            print(f"  {shape.name}, py-spy ...", file=sys.stderr, flush=True)
                            result["profile"] = profile_front_end(
                                server, shape, documents, args.seconds, pathlib.Path(scratch), args.native
                            )
                        report["shapes"].append(result)
                finally:
                    code = server.stop()
                if label == "front end":
                    report["server_exit_code"] = code
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
