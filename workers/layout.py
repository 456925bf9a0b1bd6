"""How a worker runs its rows: the layout of rows that share a head, chosen per
device, and whether torch.compile runs them (no torch here: the front end
validates names).

  padded  the head's keys and values computed once and copied into every row;
          each document padded to the longest (workers/scoring.py)
  packed  packed rows: the head once per row, documents back to back behind it,
          an attention mask keeping them apart (workers/packing.py)
  cascade the head's keys and values computed once and used in place, never
          copied: each row's attention to its head and to itself merged by their
          log-sum-exp (workers/cascade.py; FlexAttention, compiled on CUDA)

All give the same scores (tests/test_row_layouts.py). `auto` takes, per device,
the layout bench/layouts.py measured fastest there; a layout never measured on
a device is never its default. The figures are in BENCHMARKS.md ("Layouts").
"""

from __future__ import annotations

LAYOUTS = ("padded", "packed", "cascade")

# auto, per device type. CPU (2 cores, the cpu shape, workload a; issue 11 and
# BENCHMARKS.md): packed rows of <= 1,024 tokens 29.5-32.5 pairs/s, padded at
# 2,048-token batches 32.1-32.8: even, so the present path stays. CUDA: only
# `padded` has been measured; packed (dense mask or FlexAttention) and cascade
# wait for bench/gpu_check.sh. On the CPU, cascade runs FlexAttention unfused:
# exact, for the tests, and slower than padded.
DEFAULTS = {"cpu": "padded", "cuda": "padded"}

# A packed row holds at most this many tokens (more when one head + document is
# longer). On the CPU rows of <= 1,024 tokens were the fastest packing measured
# (2,048: 26.2-29.7 pairs/s, 4,096: 18.9-20.6): a dense mask's cost grows with
# the square of the row.
PACKED_ROW_TOKENS = 1024


# torch.compile of the model body: off, or a torch.compile mode (reduce-overhead
# records CUDA graphs). Never measured on a GPU yet, so off by default everywhere;
# bench/gpu_check.sh measures it. On this CPU it compiled the tiny model's three
# paths in 30-45 s each and changed no score (1.7e-6).
COMPILE_MODES = ("off", "default", "reduce-overhead")


def resolve_layout(requested: str, device: str) -> str:
    """`auto` is the layout measured fastest on the device's type; anything else must be a known name."""
    if requested == "auto":
        return DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    if requested not in LAYOUTS:
        raise ValueError(f"unknown layout {requested!r}; choose auto or one of {', '.join(LAYOUTS)}")
    return requested
