"""The precisions a model can be loaded in (no torch here: the front end validates names)."""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")


def resolve_precision(requested: str, device: str) -> str:
    """`auto` is bf16 on CUDA and fp32 on the CPU; anything else must be a known name."""
    if requested == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose auto or one of {', '.join(PRECISIONS)}")
    return requested
