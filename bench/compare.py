"""Side by side: the model card's recipe, sentence-transformers, this project's
engine in process, and the full gRPC service, on the same weights and the same
real-text workload (bench/workloads.py; contenders in bench/contenders.py).

For each contender: pairs/s, real tokens/s, p50/p95/p99 latency per request,
padding efficiency (real tokens / tokens the transformer body computed, padding
included; above 1 when a shared prefix is computed once; for the service, the
batcher's count of rows x longest row), peak memory of the
process that holds the model, and model FLOP utilisation. Model FLOPs are those
the real tokens need (2 x non-embedding parameters per token, plus causal
attention), so that padding, and the card's vocabulary-sized head, count as
waste rather than work; the peak is a matrix multiply measured here, on the same
device, dtype and threads. Also: every contender's largest logit difference from
the card recipe, the service's speed over each, and the issue's targets.

With `--repeat N` every contender runs N times, interleaved (each round runs
them all once), and the speed ratios are reported as the median of the N
rounds with their spread (lowest and highest): on a shared machine one round
can read 15% either way.

    python -m bench.compare --shape cpu --workload a            # this CPU, a few minutes
    python -m bench.compare --shape cpu --workload a --repeat 3 --contenders card-sorted engine service
    python -m bench.compare --shape cpu --workload b --requests 64
    python -m bench.compare --shape 4b --device cuda --dtype bf16 fp16 int8
    python -m bench.compare --model /path/to/checkpoint --workload c
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch
from tokenizers import Tokenizer

from bench import workloads
from bench.common import Stopwatch, add_model_arguments, model_directory, percentile, results_path
from bench.contenders import (
    CONTENDERS,
    SERVICE,
    Run,
    Setup,
    quiet,
    run_in_process,
    run_service,
    sequence_classification_copy,
)
from service.settings import Settings
from workers.layout import LAYOUTS, resolve_layout
from workers.prompt import PromptEncoder

# The dtype each precision multiplies in (nf4 weights are unpacked to bf16).
COMPUTE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
    "nf4": torch.bfloat16,
}
# The same computation; the later ones when the earlier did not run.
REFERENCES = ("card", "card-keep1", "card-sorted")


@dataclass(frozen=True)
class Target:
    """A figure the issue sets for a workload, measured and printed, never asserted."""

    workload: str
    label: str
    needs: tuple[str, ...]  # the contenders whose figures it reads
    value: Callable[[dict], float]  # from a precision's figures by contender
    at_least: bool  # the value must be >= bound (else <= bound)
    bound: float

    def check(self, rounds: Sequence[dict]) -> dict:
        """The target over rounds of figures: its median value against the bound, and the spread."""
        values = [self.value(figures) for figures in rounds]
        value = median(values)
        passed = value >= self.bound if self.at_least else value <= self.bound
        return {
            "target": self.label,
            "value": round(value, 2),
            "bound": f"{'>=' if self.at_least else '<='} {self.bound}",
            "pass": passed,
            "spread": spread(values),
        }


def _speed_over(name: str, of: str = SERVICE) -> Callable[[dict], float]:
    return lambda f: f[of]["pairs_per_s"] / f[name]["pairs_per_s"]


TARGETS = (
    Target("a", "service ÷ card-sorted pairs/s", (SERVICE, "card-sorted"), _speed_over("card-sorted"), True, 1.4),
    Target(
        "a", "engine ÷ card-sorted pairs/s", ("engine", "card-sorted"), _speed_over("card-sorted", "engine"), True, 1.45
    ),
    Target("a", "service ÷ card-keep1 pairs/s", (SERVICE, "card-keep1"), _speed_over("card-keep1"), True, 1.8),
    Target(
        "a",
        "service ÷ sentence-transformers pairs/s",
        (SERVICE, "sentence-transformers"),
        _speed_over("sentence-transformers"),
        True,
        1.4,
    ),
    Target("a", "service ÷ engine pairs/s", (SERVICE, "engine"), _speed_over("engine"), True, 0.9),
    Target(
        "b", "service p99 ÷ p50 latency", (SERVICE,), lambda f: f[SERVICE]["p99_ms"] / f[SERVICE]["p50_ms"], False, 3.0
    ),
    Target("c", "service ÷ card-keep1 pairs/s", (SERVICE, "card-keep1"), _speed_over("card-keep1"), True, 1.0),
)


@dataclass(frozen=True)
class ModelCost:
    """Forward FLOPs of a Qwen3 body, from its config."""

    non_embedding_parameters: int
    attention_flops_per_pair: int  # per (query, key) position pair, all layers: QK^T and AV

    @classmethod
    def of(cls, model_dir: str) -> ModelCost:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model_dir)
        per_layer = (
            c.hidden_size * c.head_dim * 2 * (c.num_attention_heads + c.num_key_value_heads)
            + 3 * c.hidden_size * c.intermediate_size
        )
        return cls(c.num_hidden_layers * per_layer, 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim)

    def flops(self, lengths: Iterable[int]) -> float:
        """What sequences of these lengths need: each token through every weight
        once, and attention over the n(n+1)/2 causal position pairs of each."""
        return sum(
            2 * self.non_embedding_parameters * n + self.attention_flops_per_pair * n * (n + 1) / 2 for n in lengths
        )


def matmul_peak(device: str, precision: str) -> float:
    """FLOP/s of the fastest of a second's worth of square matrix multiplies in
    the precision's compute dtype (int8 x int8 -> int32 for LLM.int8), on this
    device with the threads already set."""
    size = 8192 if device.startswith("cuda") else 2048
    dtype = COMPUTE_DTYPES[precision]
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (size, size), device=device, dtype=dtype) for _ in range(2))
        multiply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch._int_mm
    else:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        multiply = torch.matmul
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    multiply(a, b)  # warm-up
    times: list[float] = []
    while sum(times) < 1.0:
        with Stopwatch(sync) as watch:
            multiply(a, b)
        times.append(watch.seconds)
    return 2 * size**3 / min(times)


def figures(run: Run, lengths: Sequence[Sequence[int]], cost: ModelCost, peak_flops: float) -> dict:
    """A contender's figures from what it did on the first len(run.scores) requests."""
    if run.error:
        return {"error": run.error}
    done = [n for request in lengths[: len(run.scores)] for n in request]
    tokens, latencies = sum(done), [1000 * s for s in run.latencies]
    return {
        "requests": len(run.scores),
        "pairs": len(done),
        "real_tokens": tokens,
        "seconds": round(run.seconds, 3),
        "pairs_per_s": round(len(done) / run.seconds, 2),
        "tokens_per_s": round(tokens / run.seconds),
        **{f"p{p}_ms": round(percentile(latencies, p), 1) for p in (50, 95, 99)},
        "computed_tokens": run.computed_tokens,
        "padding_efficiency": round(tokens / run.computed_tokens, 3) if run.computed_tokens else None,
        "peak_memory_mib": round(run.peak_memory_bytes / 2**20) if run.peak_memory_bytes else None,
        "memory_source": run.memory_source,
        "mfu": round(cost.flops(done) / run.seconds / peak_flops, 4),
    }


def agreement(runs: dict[str, Run]) -> tuple[str, float, dict[str, float]]:
    """Each contender's largest |logit difference| from the card recipe, on the
    requests the recipe scored; also the recipe's largest |logit|, the scale
    against which those differences read."""
    reference = next((name for name in REFERENCES if name in runs and not runs[name].error), None)
    if reference is None:
        return "", 0.0, {}
    truth = runs[reference].scores
    return (
        reference,
        max(abs(x) for request in truth for x in request),
        {
            # the card ran only the first requests: compare those
            name: max(
                abs(a - b) for got, want in zip(run.scores, truth, strict=False) for a, b in zip(got, want, strict=True)
            )
            for name, run in runs.items()
            if not run.error
        },
    )


def compare_precision(
    setup: Setup, workload: workloads.Workload, card_requests: int, contenders: Sequence[str], label: str = ""
) -> dict[str, Run]:
    """Every contender on the workload at one precision; the full-logits card
    recipe only on the first `card_requests` requests (it is that slow)."""
    runs = {}
    for name in contenders:
        print(f"  {setup.precision} {name} {label}...", file=sys.stderr, flush=True)
        try:
            if name == SERVICE:
                runs[name] = run_service(setup, workload.requests, workload.clients)
            else:
                runs[name] = run_in_process(
                    name, setup, workload.requests[:card_requests] if name == "card" else workload.requests
                )
        except Exception as error:
            runs[name] = Run(error=f"{type(error).__name__}: {error}")
    return runs


def summarize(
    rounds: Sequence[dict[str, Run]],
    lengths: Sequence[Sequence[int]],
    cost: ModelCost,
    peak_flops: float,
    workload: str,
) -> dict:
    """One precision's figures (the median round's, per contender), agreement,
    the service's speed over each contender, and the targets; with more than one
    round, each ratio and target value is the median over the rounds, with its spread."""
    per_round = [{name: figures(run, lengths, cost, peak_flops) for name, run in runs.items()} for runs in rounds]
    for runs, result in zip(rounds, per_round, strict=True):
        _, _, differences = agreement(runs)
        for name, difference in differences.items():
            result[name]["max_abs_logit_diff"] = round(difference, 6)
    reference, scale, _ = agreement(rounds[0])
    ok_rounds = [{name: f for name, f in result.items() if "error" not in f} for result in per_round]
    names = [name for name in per_round[0] if all(name in ok for ok in ok_rounds)]
    contenders = {name: per_round[0][name] for name in per_round[0]}
    for name in names:  # the round whose pairs/s is the median of this contender's
        ranked = sorted(per_round, key=lambda result: result[name]["pairs_per_s"])
        contenders[name] = {**ranked[(len(ranked) - 1) // 2][name], "pairs_per_s_rounds": [
            result[name]["pairs_per_s"] for result in per_round
        ]}  # fmt: skip
    ratios = {}
    if SERVICE in names:
        for name in names:
            if name != SERVICE:
                ratios[name] = spread([ok[SERVICE]["pairs_per_s"] / ok[name]["pairs_per_s"] for ok in ok_rounds])
    targets = [
        target.check(ok_rounds)
        for target in TARGETS
        if target.workload == workload and all(name in names for name in target.needs)
    ]
    return {
        "peak_flops": round(peak_flops),
        "rounds": len(rounds),
        "reference": reference,
        "reference_max_abs_logit": round(scale, 4),
        "contenders": contenders,
        "service_pairs_per_s_over": ratios,
        "targets": targets,
    }


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def spread(values: Sequence[float]) -> dict:
    """The median of `values`, their lowest and highest, and each."""
    return {
        "median": round(median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "rounds": [round(v, 3) for v in values],
    }


def print_header(report: dict) -> None:
    w = report["workload"]
    print(
        f"workload {w['name']}: {w['description']}; {w['requests']} requests, {w['pairs']} pairs, "
        f"{w['mean_tokens_per_pair']} tokens per pair; {w['clients']} clients for the service"
    )
    parameters = report["non_embedding_parameters"] / 1e6
    print(
        f"model {report['model']} ({parameters:.1f}M non-embedding parameters) on {report['device_name']}, "
        f"{report['threads']} threads; load average {report['load_average_before']} at the start"
    )


def print_block(report: dict, precision: str) -> None:
    """One precision's table: a row per contender (its median round), then the
    issue's targets; with several rounds each ratio reads median [lowest-highest]."""
    block = report["precisions"][precision]
    columns = (
        "req",
        "pairs/s",
        "tokens/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "real/comp",
        "peak MiB",
        "MFU %",
        "max|Δlogit|",
        "service ÷",
    )
    if block["reference"]:
        agreement_note = (
            f"max|Δlogit| against {block['reference']} (its logits reach {block['reference_max_abs_logit']})"
        )
    else:
        agreement_note = "no card recipe ran: scores unchecked"
    rounds = f"median of {block['rounds']} rounds; " if block["rounds"] > 1 else ""
    peak = block["peak_flops"] / 1e9
    print(
        f"\n{precision}: {rounds}matmul peak {peak:,.0f} GFLOP/s; {agreement_note}; "
        f"load average {report['load_average_now']} now"
    )
    print(f"{'':22}" + "".join(f"{c:>12}" for c in columns))
    for name, f in block["contenders"].items():
        if "error" in f:
            print(f"{name:22}  failed: {f['error'][:160]}")
            continue
        ratio = block["service_pairs_per_s_over"].get(name)
        cells = (
            f["requests"], f["pairs_per_s"], f["tokens_per_s"], f["p50_ms"], f["p95_ms"], f["p99_ms"],
            f["padding_efficiency"], f["peak_memory_mib"], round(100 * f["mfu"], 2), f.get("max_abs_logit_diff", "-"),
            f"{ratio['median']:.2f}x" if ratio else "-",
        )  # fmt: skip
        print(f"{name:22}" + "".join(f"{c if c is not None else '-':>12}" for c in cells))
    if block["rounds"] > 1:
        for name, ratio in block["service_pairs_per_s_over"].items():
            rounds_seen = block["contenders"][name]["pairs_per_s_rounds"]
            print(f"  service ÷ {name}: {_ranged(ratio)}; {name} pairs/s per round {rounds_seen}")
    note = "" if report["device"] == "cpu" and precision == "fp32" else "  (the targets are set for CPU fp32)"
    for target in block["targets"]:
        value = _ranged(target["spread"]) if block["rounds"] > 1 else target["value"]
        print(f"  target {target['target']}: {value} ({target['bound']}) {'PASS' if target['pass'] else 'MISS'}{note}")


def _ranged(spread: dict) -> str:
    return f"{spread['median']:.2f} [{spread['min']:.2f}-{spread['max']:.2f}]"


def environment(device: str) -> dict:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "sentence-transformers", "grpcio"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    name = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    )
    return {"device_name": name, "versions": versions}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--workload", default="a", choices=list(workloads.SPECS))
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["fp32"],
        choices=list(COMPUTE_DTYPES),
        help="one or more precisions, each run in turn",
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument(
        "--requests", type=int, default=0, help="requests in the workload (default: the workload's CPU size)"
    )
    parser.add_argument("--documents", type=int, default=0, help="documents per request (default: the workload's)")
    parser.add_argument(
        "--card-requests",
        type=int,
        default=0,
        help="requests for the full-logits card recipe (default: the workload's)",
    )
    parser.add_argument(
        "--clients", type=int, default=0, help="concurrent clients for the service (default: the workload's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads in process, and the service's --cpu-threads"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rows per batch for the card recipes and sentence-transformers"
    )
    parser.add_argument("--max-length", type=int, default=defaults["max_length"])
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=defaults["max_batch_tokens"],
        help="the engine's and the service's batch budget (default 0: the service's default for --device)",
    )
    parser.add_argument(
        "--layout",
        default=defaults["layout"],
        choices=["auto", *LAYOUTS],
        help="the engine's and the service's layout (default: auto, the service's default for --device)",
    )
    parser.add_argument(
        "--head-cache-bytes",
        type=int,
        default=defaults["head_cache_bytes"],
        help="the engine's and the service's head cache (default -1: the service's default for --device)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of every contender; ratios are reported as medians with spread"
    )
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"])
    parser.add_argument("--min-padding-efficiency", type=float, default=defaults["min_padding_efficiency"])
    parser.add_argument(
        "--json",
        default="",
        help="where to write the figures (default: bench/results/compare_<model>_<workload>_<device>.json)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the comparison; the JSON is rewritten after each precision, so that a
    run cut short (the GPU check's time limit) keeps what it finished."""
    args = parse(argv)
    quiet()
    torch.set_num_threads(args.threads)
    path = results_path(args, "compare", args.workload)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as scratch:
        model_dir = model_directory(args, scratch)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # drawn weights are gone: leave the memory to the contenders
        tokenizer = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
        workload = workloads.build(args.workload, tokenizer, args.requests, args.clients, args.seed, args.documents)
        encoder = PromptEncoder(tokenizer, args.max_length)
        lengths = [
            [pair.length for pair in encoder.encode([(r.query, d) for d in r.documents])] for r in workload.requests
        ]
        classifier_dir = ""
        if "sentence-transformers" in args.contenders:
            classifier_dir = sequence_classification_copy(model_dir, str(pathlib.Path(scratch) / "classifier"))
        cost = ModelCost.of(model_dir)
        card_requests = min(args.card_requests or workloads.SPECS[args.workload].card_requests, len(workload.requests))
        report = describe(args, workload, lengths, card_requests, cost)
        print_header(report)
        for precision in args.dtype:
            setup = Setup(model_dir, precision, args.device, args.threads, args.batch_size, args.max_length,
                          args.max_batch_tokens, args.max_batch_size, args.min_padding_efficiency,
                          classifier_dir, args.layout, args.head_cache_bytes)  # fmt: skip
            peak = matmul_peak(args.device, precision)
            rounds = [
                compare_precision(setup, workload, card_requests, args.contenders, f"(round {n + 1}/{args.repeat}) ")
                for n in range(args.repeat)
            ]
            report["precisions"][precision] = summarize(rounds, lengths, cost, peak, args.workload)
            report["load_average_now"] = round(os.getloadavg()[0], 2)
            print_block(report, precision)
            path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


def describe(
    args: argparse.Namespace,
    workload: workloads.Workload,
    lengths: list[list[int]],
    card_requests: int,
    cost: ModelCost,
) -> dict:
    """The report's head: what ran, where, on what; figures go under "precisions"."""
    pairs = [n for request in lengths for n in request]
    defaults = Settings(
        model=args.model or "random", max_length=args.max_length, head_cache_bytes=args.head_cache_bytes
    )
    return {
        "model": args.model or f"random {args.shape}",
        "non_embedding_parameters": cost.non_embedding_parameters,
        "device": args.device,
        **environment(args.device),
        "threads": args.threads,
        "load_average_before": round(os.getloadavg()[0], 2),
        "workload": {
            "name": workload.name,
            "description": workload.description,
            "requests": len(workload.requests),
            "pairs": len(pairs),
            "real_tokens": sum(pairs),
            "mean_tokens_per_pair": round(sum(pairs) / len(pairs), 1),
            "min_tokens": min(pairs),
            "max_tokens": max(pairs),
            "clients": workload.clients,
            "card_requests": card_requests,
            "seed": args.seed,
        },
        "settings": {
            **{k: getattr(args, k) for k in ("batch_size", "max_length", "max_batch_size", "min_padding_efficiency")},
            "max_batch_tokens": args.max_batch_tokens or defaults.batch_tokens(args.device),
            "layout": resolve_layout(args.layout, args.device),
            "head_cache_bytes": defaults.head_cache(args.device),
            "repeat": args.repeat,
        },
        "precisions": {},
    }


if __name__ == "__main__":
    main(sys.argv[1:])
