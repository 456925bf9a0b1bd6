"""`python -m tests.slow_server --worker-delay-ms N [reranker serve flags]`: the
real server, with worker processes whose scorer sleeps N ms before each batch
(tests.doubles). For the end-to-end tests of what only processes show: signals
and kills while work is in flight."""

from __future__ import annotations

import argparse
import functools
import sys

from service.pool import ProcessLauncher
from service.server import run
from service.settings import add_arguments, build_settings
from tests.doubles import Load
from workers import process


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.slow_server")
    parser.add_argument("--worker-delay-ms", type=float, required=True)
    add_arguments(parser)
    arguments = parser.parse_args(argv)
    delay_s = arguments.worker_delay_ms / 1000
    del arguments.worker_delay_ms
    launcher = ProcessLauncher(functools.partial(process.run, load=Load(delay_s=delay_s)))
    return run(build_settings(arguments), launcher)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
