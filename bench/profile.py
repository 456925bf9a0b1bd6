"""Where the time goes: torch.profiler over steady-state batches of the engine,
and the front end's own costs per pair beside them.

The batches are the service's: workload (a)'s requests tokenized with the
service's PromptEncoder, all queued in one PendingQueue and planned at the
worker's budget, as under load from many clients. After `--warm-batches`
batches (warm-up, allocator, kernels chosen), `--batches` batches run under the
profiler. Device time (kernels on CUDA, operators' own time on the CPU) is
split into attention (and which SDPA backend ran), GEMMs, indexing (in the
padded layout mostly the shared head's keys and values copied into every row),
other copies,
norms and element-wise work, and the rest; host gaps are the profiled wall
time in which the device ran nothing (on the CPU: time outside any operator,
Python and framework overhead). The front end's share is what it spends per
pair in its one process: tokenizing, planning, and framing batches for the
worker socket, measured here on one thread (after one request's warm-up).

Printed as one table per layout and written as JSON:

    python -m bench.profile --shape 0.6b --device cuda --dtype bf16 --layouts padded packed
    python -m bench.profile --model /tmp/tiny --requests 1 --documents 8 --batches 2   # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench import workloads
from bench.common import Stopwatch, add_model_arguments, model_directory, model_name, results_path
from bench.contenders import plan_batches, quiet
from workers.layout import LAYOUTS
from workers.precision import PRECISIONS
from workers.prompt import EncodedPair, PromptEncoder
from workers.protocol import ScoreBatch
from workers.scoring import load_scorer

# Kernel or operator name fragments (lower case) per category, first match wins.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn", "softmax", "flex")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "scaled_mm")),
    # in the padded layout mostly the shared head's keys and values copied into every row (the cache's
    # batch_select_indices); the rest is reading each row's last position
    ("index (head kv copy)", ("aten::index", "index_elementwise", "indexselect", "index_select", "gather")),
    ("copies", ("memcpy", "memset", "copy", "aten::cat", "catarraybatched", "gather", "pad", "clone", "fill", "index")),
    ("norm and element-wise", ("norm", "rsqrt", "pow", "mean", "mul", "add", "silu", "neg", "cos", "sin", "elementwise",
                               "vectorized", "reduce", "where", "bitwise", "div", "sum", "exp")),
)  # fmt: skip
# The SDPA backend an operator name reveals.
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (backend-defined)",
}


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


def front_end_costs(encoder: PromptEncoder, requests: Sequence[workloads.Request], budget: int) -> dict:
    """Seconds per pair the front end spends, on one thread: tokenizing (as the
    Ranker does, one call per request), planning batches, and framing them."""
    warm = encoder.encode([(requests[0].query, d) for d in requests[0].documents])
    plan_batches(warm, budget, 256, 0.9)
    with Stopwatch() as tokenizing:
        encoded = [encoder.encode([(r.query, d) for d in r.documents]) for r in requests]
    pairs = [pair for request in encoded for pair in request]
    with Stopwatch() as planning:
        batches = plan_batches(pairs, budget, 256, 0.9)
    with Stopwatch() as framing:
        for number, batch in enumerate(batches):
            ScoreBatch.decode(ScoreBatch.from_pairs(number, [pairs[index] for index in batch]).encode())
    count = len(pairs)
    return {
        "pairs": count,
        "tokenize_s_per_pair": tokenizing.seconds / count,
        "plan_s_per_pair": planning.seconds / count,
        "frame_s_per_pair": framing.seconds / count,
        "encoded": encoded,
        "batches": batches,
    }


def profile_layout(
    model_dir: str, device: str, precision: str, layout: str, attn: str, batches: list[list[EncodedPair]], warm: int
) -> dict:
    """Warm up on `warm` batches, time the rest without the profiler, then profile them."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    scorer = load_scorer(model_dir, device, precision, attn, layout)
    frames = [ScoreBatch.from_pairs(number, batch) for number, batch in enumerate(batches)]
    for frame in frames[:warm]:
        scorer.score(frame)
    measured = frames[warm:]
    with Stopwatch(sync) as plain:
        for frame in measured:
            scorer.score(frame)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sync else [])
    with profile(activities=activities) as profiler, Stopwatch(sync) as profiled:
        for frame in measured:
            scorer.score(frame)
    result = summarize(profiler, profiled.seconds, on_device=sync is not None)
    pairs = sum(len(frame.lengths) for frame in measured)
    tokens = sum(sum(frame.lengths) for frame in measured)
    result |= {
        "layout": layout,
        "attn": attn,
        "batches": len(measured),
        "pairs": pairs,
        "real_tokens": tokens,
        "engine_s_per_batch": plain.seconds / len(measured),
        "engine_pairs_per_s": pairs / plain.seconds,
    }
    del scorer
    gc.collect()
    if sync:
        torch.cuda.empty_cache()
    return result


def summarize(profiler: profile, wall_s: float, on_device: bool) -> dict:
    """Device time per category, the SDPA backends seen, and host gaps."""
    times: dict[str, float] = {label: 0.0 for label, _ in CATEGORIES} | {"other": 0.0}
    top: dict[str, float] = {}
    backends: dict[str, int] = {}
    for entry in profiler.key_averages():
        if entry.key in SDPA_BACKENDS:
            backends[SDPA_BACKENDS[entry.key]] = backends.get(SDPA_BACKENDS[entry.key], 0) + entry.count
        own = entry.self_device_time_total if on_device else entry.self_cpu_time_total
        if (entry.device_type == DeviceType.CUDA) != on_device or own <= 0:
            continue
        times[category(entry.key)] += own / 1e6
        top[entry.key] = top.get(entry.key, 0.0) + own / 1e6
    if on_device:
        busy = _union(
            [(e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == DeviceType.CUDA]
        )
    else:
        busy = sum(times.values())  # operators' own time on the calling thread
    busy_s = busy / 1e6 if on_device else busy
    return {
        "profiled_wall_s": wall_s,
        "device_busy_s": busy_s,
        "host_gaps_s": max(0.0, wall_s - busy_s),
        "device_s_by_category": times,
        "sdpa_backends": backends,
        "top_kernels": dict(sorted(top.items(), key=lambda item: -item[1])[:12]),
    }  # fmt: skip


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def print_table(shape: str, report: dict) -> None:
    fe = report["front_end"]
    front_per_pair = fe["tokenize_s_per_pair"] + fe["plan_s_per_pair"] + fe["frame_s_per_pair"]
    for result in report["layouts"]:
        wall = result["profiled_wall_s"]
        per_batch = 1000 / result["batches"]
        print(
            f"\n{shape} {report['precision']} {result['layout']} ({result['attn']}): {result['batches']} batches, "
            f"{result['pairs']} pairs, {result['real_tokens'] / result['pairs']:.0f} tokens per pair; "
            f"engine {result['engine_pairs_per_s']:.1f} pairs/s without the profiler"
        )
        print(f"  {'part':44}{'ms/batch':>10}{'share':>8}")
        rows = [(label, seconds) for label, seconds in result["device_s_by_category"].items()]
        gaps = "host gaps (device idle)" if report["on_device"] else "outside operators (Python)"
        rows.append((gaps, result["host_gaps_s"]))
        for label, seconds in rows:
            print(f"  {label:44}{seconds * per_batch:>10.2f}{100 * seconds / wall:>7.1f}%")
        print(f"  {'profiled wall':44}{wall * per_batch:>10.2f}")
        backends = ", ".join(f"{name} x{count}" for name, count in result["sdpa_backends"].items()) or "none seen"
        print(f"  SDPA backends: {backends}")
        engine_per_pair = 1 / result["engine_pairs_per_s"]
        print(
            f"  front end, one thread, per pair: tokenize {1e6 * fe['tokenize_s_per_pair']:.0f} us, plan "
            f"{1e6 * fe['plan_s_per_pair']:.0f} us, frames {1e6 * fe['frame_s_per_pair']:.0f} us: "
            f"{100 * front_per_pair / (front_per_pair + engine_per_pair):.0f}% of front end + engine time; "
            f"{1 / front_per_pair:,.0f} pairs per front-end CPU second"
        )  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dtype", default="fp32", choices=PRECISIONS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help="layout[/flex] (flex: FlexAttention)")
    parser.add_argument("--budget", type=int, default=0, help="padded tokens per batch (default: the device's)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--documents", type=int, default=0)
    parser.add_argument("--warm-batches", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6, help="batches profiled")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default="", help="default: bench/results/profile_<model>_<device>.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    from service.settings import Settings

    args = parse(argv)
    quiet()
    torch.set_num_threads(args.threads)
    path = results_path(args, "profile")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:
        model_dir = model_directory(args, scratch)
        tokenizer = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
        workload = workloads.build("a", tokenizer, args.requests, 0, 0, args.documents)
        budget = args.budget or Settings(model=model_dir).batch_tokens(args.device)
        costs = front_end_costs(PromptEncoder(tokenizer), workload.requests, budget)
        pairs = [pair for request in costs.pop("encoded") for pair in request]
        batches = [[pairs[index] for index in batch] for batch in costs.pop("batches")]
        batches = batches[: args.warm_batches + args.batches]
        if len(batches) <= args.warm_batches:
            raise SystemExit(f"{len(batches)} batches: more requests needed for {args.warm_batches} warm-up batches")
        report = {
            "model": args.model or f"random {args.shape}",
            "device": args.device,
            "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            "on_device": args.device.startswith("cuda"),
            "precision": args.dtype,
            "budget": budget,
            "torch": torch.__version__,
            "threads": args.threads,
            "load_average": round(os.getloadavg()[0], 2),
            "front_end": costs,
            "layouts": [],
        }
        for text in args.layouts:
            layout, _, option = text.partition("/")
            attn = "flex_attention" if option == "flex" else "sdpa"
            print(f"  profiling {text} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                result = profile_layout(model_dir, args.device, args.dtype, layout, attn, batches, args.warm_batches)
            except Exception as error:  # one layout failing must not lose the others
                result = {"layout": layout, "attn": attn, "error": f"{type(error).__name__}: {error}"}
            result["seconds"] = round(time.monotonic() - started, 1)
            report["layouts"].append(result)
            path.write_text(json.dumps(report, indent=2) + "\n")
    report["layouts"], failed = (
        [r for r in report["layouts"] if "error" not in r],
        [r for r in report["layouts"] if "error" in r],
    )
    name = model_name(args)
    print_table(name, report)
    for result in failed:
        print(f"\n{name} {result['layout']} ({result['attn']}) failed: {result['error'][:300]}")
    report["failed"] = failed
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
