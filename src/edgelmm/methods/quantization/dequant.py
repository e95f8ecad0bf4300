"""W4A16 / W8A16 for many rows (prefill) on CUDA: the checkpoint's packed weight dequantized to
16 bits by one Triton kernel, then multiplied by cuBLAS.

At a prefill the multiply is the large part of the work and cuBLAS is the fastest there is; the
16-bit copy lives for one layer's call. A tiled Triton W4A16 GEMM that unpacks in registers was
measured against this on an H200 (Qwen2.5-7B shapes, 128 to 4,096 rows) and lost at every shape,
by 4x to 42x (`benchmarks/engine/results/h200-w4a16.json`, "kernels"), so it is not shipped.

Layout (compressed-tensors): weights `[N, K * bits / 32]` int32, value j of a word at bits
[bits*j, bits*j + bits), unsigned (signed + 2^(bits-1)); scales `[N, K / group]`; zero points
`[ceil(N * bits / 32), K / group]` int32, packed along N the same way (symmetric: 2^(bits-1)).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch dequantize path serves
    triton = None


def available(layer: torch.nn.Module) -> bool:
    return (triton is not None and layer.weight_packed is not None and layer.weight_packed.is_cuda
            and layer.group_size % 32 == 0 and layer.in_features % 32 == 0)


if triton is not None:

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, BITS: tl.constexpr, GROUP: tl.constexpr,
                        HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (rows < N)[:, None] & (cols < K)[None, :]
        words = tl.load(w_ptr + rows[:, None].to(tl.int64) * (K // PER_WORD) + (cols // PER_WORD)[None, :], mask=ok, other=0)
        q = ((words >> ((cols % PER_WORD) * BITS)[None, :]) & MASK).to(tl.float32)
        groups = K // GROUP
        g = cols // GROUP
        scale = tl.load(s_ptr + rows[:, None] * groups + g[None, :], mask=ok, other=0).to(tl.float32)
        if HAS_ZERO:
            zword = tl.load(z_ptr + (rows // PER_WORD)[:, None] * groups + g[None, :], mask=ok, other=0)
            zero = ((zword >> ((rows % PER_WORD) * BITS)[:, None]) & MASK).to(tl.float32)
        else:
            zero = OFFSET
        w = (q - zero) * scale
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)

def dequantize(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [N, K] in `dtype`, written once by one kernel."""
    n, k = layer.out_features, layer.in_features
    out = torch.empty(n, k, dtype=dtype, device=layer.weight_packed.device)
    zero = layer.weight_zero_point if layer.weight_zero_point is not None else layer.weight_scale
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _dequant_kernel[grid](layer.weight_packed, layer.weight_scale, zero, out, n, k, BITS=layer.bits, GROUP=layer.group_size,
                          HAS_ZERO=layer.weight_zero_point is not None, BLOCK_N=32, BLOCK_K=256)
    return out
