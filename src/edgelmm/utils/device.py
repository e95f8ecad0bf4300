"""Where a model runs: the one rule for `device="auto"` and `dtype="auto"`."""

from __future__ import annotations

from typing import Any

from edgelmm.errors import EdgelmmError


def device_type(device: str) -> str:
    """'cpu' or 'cuda' for a device setting; 'auto' is CUDA when torch sees a GPU."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def resolve_device(device: str) -> Any:
    """A torch.device; asking for CUDA without one is an error, not a silent CPU run."""
    import torch

    kind = device_type(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise EdgelmmError("device 'cuda' asked for, but torch sees no CUDA GPU", "use --device cpu, or install a CUDA build of torch")
    return torch.device(device if device != "auto" else kind)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """auto: bfloat16 on CUDA, float32 on the CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)
