"""torch's int4 tensor-core kernel ("tinygemm") as a runtime layout for 4-bit `QuantLinear`.

`torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)` computes x Wᵀ with W
in a tiled int4 layout made by `_convert_weight_to_int4pack` (CUDA, sm80+: uint8 `[N, K/2]`,
even k in the high nibble) or `_convert_weight_to_int4pack_for_cpu` (int32 `[N, K]`), and
`scales_and_zeros` bfloat16 `[K/group, N, 2]`. Its convention is w = (u - 8) · scale + zero with
u the unsigned 4-bit value. Ours (compressed-tensors) is w = (q - z) · s with q = u - 8 and z
the signed zero point, so scale = s and zero = -z · s (= (8 - z_unsigned) · s).

The layout is made from the checkpoint's tensors at run time and *replaces* them on the device
(same bytes for the weight; 4 bytes per scale and zero pair instead of 2.5). Nothing is lost:
`unpack` gives back the exact integers (the kernel run on identity rows with scale 1 and zero 8
returns u itself), and z = round(-zero / s) exactly (bfloat16 rounding moves -z·s by at most
|z·s| / 512, far less than half a step), so `QuantLinear.state_dict()` still writes the
checkpoint format bit for bit.
"""

from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128, 256)
TILE_N = 8
TILE_K = 16


def inner_k_tiles(in_features: int) -> int | None:
    """The largest of 8, 4, 2 k-tiles per inner step that divides `in_features`."""
    return next((t for t in (8, 4, 2) if in_features % (t * TILE_K) == 0), None)


def unsupported(layer: torch.nn.Module, device: torch.device) -> str | None:
    """Why the layer cannot use the kernel on `device` (None when it can)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "this torch has no _weight_int4pack_mm"
    if layer.bits != 4:
        return f"{layer.bits}-bit weights (the kernel is 4-bit only)"
    if layer.group_size not in GROUP_SIZES:
        return f"group size {layer.group_size} (the kernel takes {GROUP_SIZES})"
    if layer.out_features % TILE_N or inner_k_tiles(layer.in_features) is None:
        return f"shape {layer.out_features}x{layer.in_features} (needs out % 8 == 0 and in % 32 == 0)"
    if layer.weight_scale is not None and layer.weight_scale.dtype != torch.bfloat16:
        return f"{layer.weight_scale.dtype} scales (the kernel's are bfloat16; converting would not be exact)"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "CUDA compute capability below 8.0"
    elif device.type == "cpu":
        if layer.out_features % 16:
            return f"{layer.out_features} outputs (the CPU kernel needs a multiple of 16)"
    else:
        return f"device {device.type}"
    return None


def pack(q_unsigned: torch.Tensor, tiles: int) -> torch.Tensor:
    """Unsigned 4-bit integers [N, K] (any integer dtype) -> the kernel's tiled layout on their device."""
    q = q_unsigned.to(torch.int32)
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)
    pairs = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """scale [N, G] and signed zero points [N, G] (None: symmetric) -> bfloat16 [G, N, 2]."""
    s = scale.float()
    offset = torch.zeros_like(s) if zero is None else -zero.float() * s
    return torch.stack([s, offset], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16) @ Wᵀ -> [M, N] bfloat16."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


def unpack(packed: torch.Tensor, sz: torch.Tensor, group_size: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unsigned integers [N, K] int32, scale [N, G] bfloat16, signed zero points [N, G] int8)."""
    groups, n, _ = sz.shape
    scale = sz[..., 0].t().contiguous()
    zero = torch.round(-sz[..., 1].float() / sz[..., 0].float()).clamp(-8, 7).to(torch.int8).t().contiguous()
    # scale 1 and zero 8 make the kernel's weight the unsigned integer itself; identity rows read it out
    unit = torch.stack([torch.ones(groups, n), torch.full((groups, n), 8.0)], dim=-1).to(torch.bfloat16).to(packed.device)
    chunk = max(1, min(in_features, 2**25 // max(n, 1)))
    q = torch.empty(n, in_features, dtype=torch.int32, device=packed.device)
    for k0 in range(0, in_features, chunk):
        rows = min(chunk, in_features - k0)
        eye = torch.zeros(rows, in_features, dtype=torch.bfloat16, device=packed.device)
        eye[torch.arange(rows), torch.arange(k0, k0 + rows)] = 1
        q[:, k0 : k0 + rows] = mm(eye, packed, group_size, unit).t().to(torch.int32)
    return q, scale, zero
