"""`python -m bench.null_server [reranker serve flags]`: the real server whose
workers do no model work, for measuring the front end's ceiling (bench/frontend.py).

Each worker is the production worker process (workers.process.run: the same
socket, frames and loop) with a scorer that answers every row with 0.0 at
once. Everything before the worker runs as in production: gRPC, the
interceptors, validation, tokenizing, the batcher, the pool. Benchmark-only:
nothing in service/ or workers/ knows about it. Neither this module nor the
front end imports torch (the worker's loop imports it to name its errors).
"""

from __future__ import annotations

import argparse
import functools
import sys
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from service.pool import ProcessLauncher
from service.server import run
from service.settings import add_arguments, build_settings
from workers import process
from workers.heads import HeadCache
from workers.protocol import ScoreBatch

if TYPE_CHECKING:
    from workers.scoring import Scorer  # never imported at run time: no torch here


@dataclass(frozen=True)
class _Device:
    type: str = "cpu"


@dataclass
class NullScorer:
    """Scores nothing: every row gets 0.0. The attributes are those the worker loop reads."""

    precision: str = "none"
    memory_bytes: int = 0
    device: _Device = field(default_factory=_Device)
    heads: HeadCache = field(default_factory=lambda: HeadCache(0))  # never looked up

    def score(self, batch: ScoreBatch) -> tuple[array, int]:
        return array("f", bytes(4 * len(batch.lengths))), 0


def load(spec: process.WorkerSpec) -> process.Loaded:
    """A worker's `load`: no checkpoint, no warm-up; a token costs nothing."""
    scorer = cast("Scorer", NullScorer())  # duck-typed: the loop calls score and reads four attributes
    return process.Loaded(scorer, budget=0, seconds_per_token=0.0, seconds=0.0)


def main(argv: list[str]) -> int:
    """`reranker serve` with null workers."""
    parser = argparse.ArgumentParser(prog="python -m bench.null_server")
    add_arguments(parser)
    launcher = ProcessLauncher(functools.partial(process.run, load=load))
    return run(build_settings(parser.parse_args(argv)), launcher)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
