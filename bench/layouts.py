"""Layouts and options side by side, in process, on the same weights and requests:
each worker layout (workers/layout.py) at each batch budget, and the options
that are off until measured (FlexAttention, torch.compile, CUDA graphs, fp8,
the head cache on CUDA),
each with its largest logit difference from fp32 on the same weights.

The scorer runs as the engine contender of bench/compare.py does: one request
at a time, in the batches the service's planner makes for it. Tokenizing is
done beforehand and not timed: this compares model-side work only. Every
variant first warms up (the scorer's warm-up, then the first request: where
compiling happens, reported as `warm-up s`); the timed pass then scores every
request. With `--repeat N` the variants run N rounds, interleaved, and each
reads the median of its rounds, with the spread.

A variant is a layout and options joined by `/`: `padded`, `packed`,
`packed/flex` (FlexAttention, CUDA only), `padded/compile` (torch.compile),
`padded/graphs` (torch.compile with CUDA graphs), `padded/heads` (a 256 MiB
head cache, workers/heads.py; without it no head is kept), and a precision
name to override --dtype (`fp8/padded`, `int8/padded`). The reference is fp32 with the
padded layout on the same device, run first.

    python -m bench.layouts --shape cpu --budgets 2048 4096 --repeat 3    # this CPU
    python -m bench.layouts --shape 0.6b --device cuda --dtype bf16 \\
        --variants padded packed packed/flex padded/compile padded/graphs fp8/padded
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
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from bench import workloads
from bench.common import Stopwatch, add_model_arguments, model_directory, percentile, results_path
from bench.contenders import TokenCounter, plan_batches, quiet
from workers.layout import COMPILE_MODES, LAYOUTS
from workers.precision import PRECISIONS
from workers.prompt import EncodedPair, PromptEncoder
from workers.protocol import ScoreBatch
from workers.scoring import Scorer, load_scorer

# option name: (the Variant field it sets, its value)
OPTIONS = {
    "flex": ("attn", "flex_attention"),
    "eager": ("attn", "eager"),
    "compile": ("compile_mode", "default"),
    "graphs": ("compile_mode", "reduce-overhead"),
    "heads": ("head_cache_bytes", 256 * 2**20),
}
assert {value for field, value in OPTIONS.values() if field == "compile_mode"} <= set(COMPILE_MODES)


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str
    precision: str
    attn: str = "sdpa"
    compile_mode: str = "off"
    head_cache_bytes: int = 0

    @classmethod
    def parse(cls, text: str, precision: str) -> Variant:
        """`layout[/option...]`, options from OPTIONS or a precision name."""
        fields: dict = {"layout": "padded", "precision": precision}
        for part in text.split("/"):
            if part in LAYOUTS:
                fields["layout"] = part
            elif part in PRECISIONS:
                fields["precision"] = part
            elif part in OPTIONS:
                name, value = OPTIONS[part]
                fields[name] = value
            else:
                raise ValueError(f"unknown part {part!r} of variant {text!r}")
        return cls(text, **fields)


def score_requests(scorer: Scorer, requests: Sequence[Sequence[EncodedPair]], budget: int, rows: int) -> list[float]:
    """Every request's logits, request after request, in the service planner's batches."""
    out: list[float] = []
    for pairs in requests:
        logits = [0.0] * len(pairs)
        for batch in plan_batches(pairs, budget, rows, 0.9):
            scores, _ = scorer.score(ScoreBatch.from_pairs(0, [pairs[index] for index in batch]))
            for index, logit in zip(batch, scores.tolist(), strict=True):
                logits[index] = logit
        out += logits
    return out


def measure(
    model_dir: str, device: str, variant: Variant, budget: int, requests: Sequence[Sequence[EncodedPair]], rows: int
) -> dict:
    """One variant at one budget: load, warm up, score every request once (timed)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    if sync:
        torch.cuda.reset_peak_memory_stats()
    with Stopwatch(sync) as warm:
        scorer = load_scorer(
            model_dir,
            device,
            variant.precision,
            variant.attn,
            variant.layout,
            variant.compile_mode,
            variant.head_cache_bytes,
        )
        scorer.warm_up(max(pair.length for pairs in requests for pair in pairs), budget)
        score_requests(scorer, requests[:1], budget, rows)
        scorer.heads.clear()  # the timed pass computes every request's head at least once
    counter = TokenCounter(scorer.embeddings)
    with Stopwatch(sync) as timed:
        logits = score_requests(scorer, requests, budget, rows)
    pairs = sum(len(r) for r in requests)
    real = sum(pair.length for r in requests for pair in r)
    result = {
        "variant": variant.name,
        "budget": budget,
        "pairs_per_s": round(pairs / timed.seconds, 2),
        "tokens_per_s": round(real / timed.seconds),
        "computed_over_real": round(counter.tokens / real, 3),
        "warm_up_s": round(warm.seconds, 1),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if sync else None,
        "logits": logits,
    }
    del scorer, counter
    gc.collect()
    if sync:
        torch.cuda.empty_cache()
    return result


def agreement(logits: Sequence[float], reference: Sequence[float]) -> dict:
    got, want = torch.tensor(logits), torch.tensor(reference)
    ranks = [t.argsort().argsort().double() for t in (got, want)]
    ranks = [r - r.mean() for r in ranks]
    spearman = float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))
    return {"max_abs_logit_diff": round((got - want).abs().max().item(), 6), "spearman": round(spearman, 5)}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dtype", default="fp32", choices=PRECISIONS, help="the variants' precision")
    parser.add_argument("--variants", nargs="+", default=["padded", "packed"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[2048, 4096], help="padded tokens per batch")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--workload", default="a", choices=list(workloads.SPECS))
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--documents", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each variant reads its median round")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds; variants not begun by then are skipped")
    parser.add_argument("--json", default="", help="default: bench/results/layouts_<model>_<device>.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every variant at every budget; the JSON is rewritten after each, so
    that a run cut short keeps what it finished."""
    args = parse(argv)
    quiet()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    path = results_path(args, "layouts")
    variants = [Variant.parse(text, args.dtype) for text in args.variants]
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as scratch:
        model_dir = model_directory(args, scratch)
        tokenizer = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
        workload = workloads.build(args.workload, tokenizer, args.requests, 0, 0, args.documents)
        encoder = PromptEncoder(tokenizer, args.max_length)
        requests = [encoder.encode([(r.query, d) for d in r.documents]) for r in workload.requests]
        pairs = [pair for request in requests for pair in request]
        report = {
            "model": args.model or f"random {args.shape}",
            "device": args.device,
            "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            "threads": args.threads,
            "torch": torch.__version__,
            "load_average_before": round(os.getloadavg()[0], 2),
            "workload": {
                "name": workload.name,
                "requests": len(requests),
                "pairs": len(pairs),
                "mean_tokens_per_pair": round(sum(p.length for p in pairs) / len(pairs), 1),
                "mean_shared_tokens": round(sum(p.shared for p in pairs) / len(pairs), 1),
            },
            "repeat": args.repeat,
            "results": [],
        }
        described = report["workload"]
        print(
            f"workload {workload.name}: {len(requests)} requests, {len(pairs)} pairs, "
            f"{described['mean_tokens_per_pair']} tokens per pair ({described['mean_shared_tokens']} of them "
            f"the shared head); {args.device}, {args.threads} threads"
        )
        print("  reference: fp32 padded ...", file=sys.stderr, flush=True)
        reference = measure(model_dir, args.device, Variant("fp32", "padded", "fp32"), max(args.budgets), requests, 256)
        report["reference"] = {k: v for k, v in reference.items() if k != "logits"}
        rounds: dict[tuple[str, int], list[dict]] = {}
        for round_number in range(args.repeat):
            for variant in variants:
                for budget in args.budgets:
                    if args.time_limit and time.monotonic() - start > args.time_limit:
                        report["skipped_after_time_limit"] = True
                        continue
                    print(f"  {variant.name} @ {budget} (round {round_number + 1})...", file=sys.stderr, flush=True)
                    try:
                        result = measure(model_dir, args.device, variant, budget, requests, args.max_batch_size)
                        result |= agreement(result.pop("logits"), reference["logits"])
                    except Exception as error:  # one variant failing (fp8 on an old GPU) must not stop the others
                        result = {
                            "variant": variant.name,
                            "budget": budget,
                            "error": f"{type(error).__name__}: {error}",
                        }
                    rounds.setdefault((variant.name, budget), []).append(result)
                    report["results"] = [median_round(found) for found in rounds.values()]
                    path.write_text(json.dumps(report, indent=2) + "\n")
        report["load_average_now"] = round(os.getloadavg()[0], 2)
        path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {path}")
    return report


def median_round(found: list[dict]) -> dict:
    """A variant's median round (by pairs/s), with every round's pairs/s."""
    ok = [result for result in found if "error" not in result]
    if not ok:
        return found[-1]
    ranked = sorted(ok, key=lambda result: result["pairs_per_s"])
    rates = [result["pairs_per_s"] for result in ok]
    return {
        **ranked[(len(ranked) - 1) // 2],
        "pairs_per_s_rounds": rates,
        "pairs_per_s_median": round(percentile(rates, 50), 2),
    }


def print_table(report: dict) -> None:
    columns = ("pairs/s", "rounds", "tokens/s", "comp/real", "warm-up s", "peak MiB", "max|Δ| fp32", "Spearman")
    reference = report["reference"]
    print(f"\nreference fp32 padded @ {reference['budget']}: {reference['pairs_per_s']} pairs/s")
    print(f"{'variant @ budget':28}" + "".join(f"{c:>13}" for c in columns))
    for r in report["results"]:
        label = f"{r['variant']} @ {r['budget']}"
        if "error" in r:
            print(f"{label:28}  failed: {r['error'][:140]}")
            continue
        spread = f"{min(r['pairs_per_s_rounds']):.1f}-{max(r['pairs_per_s_rounds']):.1f}"
        cells = (
            r["pairs_per_s_median"], spread, r["tokens_per_s"], r["computed_over_real"], r["warm_up_s"],
            r["peak_memory_mib"], r["max_abs_logit_diff"], r["spearman"],
        )  # fmt: skip
        print(f"{label:28}" + "".join(f"{c if c is not None else '-':>13}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
