"""What tensors a piece of code makes, seen from the torch functions it calls."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class ShapesMade(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns inside the block.
    A function mode, not a dispatch mode: FlexAttention refuses to run under the latter."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.append(tensor.shape)
        return out
