"""The precisions a model can be loaded in (no torch here: the front end validates names)."""

from __future__ import annotations

# fp8: torchao's float8 weights and dynamic activations, on CUDA GPUs of compute
# capability 8.9 or newer (Ada, Hopper) only; unmeasured so far (bench/gpu_check.sh).
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp8")
QUANTIZED = ("int8", "nf4", "fp8")


def resolve_precision(requested: str, device: str) -> str:
    """`auto` is bf16 on CUDA and fp32 on the CPU; anything else must be a known name."""
    if requested == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose auto or one of {', '.join(PRECISIONS)}")
    return requested
