"""Fused W4A16 / W8A16 matrix-vector kernel in Triton, for decode on CUDA.

At batch-1 decode a linear layer is bound by reading its weights, so reading 4-bit integers
instead of 16-bit values is the whole gain, provided the kernel never writes a dequantized copy.
Each program owns BLOCK_N output rows and walks the input dimension one quantization group at a
time (GROUPS_PER_STEP groups unrolled per loop step, so their loads are in flight together): it
loads the packed words of its rows straight from the compressed-tensors layout, unpacks them in
registers and accumulates `scale * (sum_j q_j x_j - zero * sum_j x_j)` in float32, one
multiply per weight and one scale and zero point per row and group. Two ways to unpack are
autotuning candidates (each word once, split in a third register dimension; or each word once per
value, a plain 2-D tile); the autotuner keeps the faster per layer shape. Grid axis 1 runs over
the rows of x, so a few rows (speculative verification, small batches) use the same kernel.

Imported only on CUDA; `available` says whether the kernel can serve a layer.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs, Jetson without it): the dequantize path serves
    triton = None


def available(layer: torch.nn.Module) -> bool:
    """Triton is there and a group fits one step's registers (a power of two up to 256)."""
    group = layer.group_size
    return triton is not None and group <= 256 and group & (group - 1) == 0 and layer.weight_packed.is_contiguous()


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "GROUPS_PER_STEP": gps, "DUPLICATE_LOADS": dup}, num_warps=w, num_stages=st)
            for bn, gps, dup, w, st in [
                (8, 4, False, 4, 3), (16, 2, False, 4, 3), (16, 4, False, 4, 3), (32, 2, False, 4, 3),
                (32, 4, False, 8, 3), (64, 2, False, 8, 2),
                (8, 4, True, 4, 3), (16, 2, True, 4, 3), (16, 4, True, 8, 3), (32, 2, True, 8, 3),
            ]
        ],
        key=["N", "K", "BITS", "GROUP"],
    )
    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        N, K, stride_xm, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, DUPLICATE_LOADS: tl.constexpr,
    ):
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = GROUP // PER_WORD
        MASK: tl.constexpr = (1 << BITS) - 1
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        groups = K // GROUP
        k_words = K // PER_WORD
        x_row = x_ptr + m * stride_xm
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, K, GROUP * GROUPS_PER_STEP):
            for step in tl.static_range(GROUPS_PER_STEP):  # unrolled: independent loads in flight
                kg = k0 + step * GROUP
                ok = kg < K  # K is a multiple of GROUP: a group is wholly in or out
                if DUPLICATE_LOADS:  # [BLOCK_N, GROUP]: each word loaded once per value it holds
                    ks = tl.arange(0, GROUP)
                    x = tl.load(x_row + kg + ks, mask=kg + ks < K, other=0).to(tl.float32)
                    packed = tl.load(
                        w_ptr + rows[:, None] * k_words + ((kg + ks) // PER_WORD)[None, :],
                        mask=row_ok[:, None] & (kg + ks < K)[None, :], other=0,
                    )
                    q = ((packed >> ((ks % PER_WORD) * BITS)[None, :]) & MASK).to(tl.float32)
                    dot = tl.sum(q * x[None, :], axis=1)
                    xsum = tl.sum(x, axis=0)
                else:  # [BLOCK_N, WORDS, PER_WORD]: each word loaded once, unpacked in registers
                    words = tl.arange(0, WORDS)
                    lanes = tl.arange(0, PER_WORD)
                    kk = kg + words[:, None] * PER_WORD + lanes[None, :]
                    x = tl.load(x_row + kk, mask=kk < K, other=0).to(tl.float32)
                    packed = tl.load(
                        w_ptr + rows[:, None] * k_words + (kg // PER_WORD + words)[None, :],
                        mask=row_ok[:, None] & ok, other=0,
                    )
                    q = ((packed[:, :, None] >> (lanes * BITS)[None, None, :]) & MASK).to(tl.float32)
                    dot = tl.sum(tl.sum(q * x[None, :, :], axis=2), axis=1)
                    xsum = tl.sum(tl.sum(x, axis=1), axis=0)
                g = kg // GROUP
                scale = tl.load(s_ptr + rows * groups + g, mask=row_ok & ok, other=0).to(tl.float32)
                if HAS_ZERO:
                    zword = tl.load(z_ptr + (rows // PER_WORD) * groups + g, mask=row_ok & ok, other=0)
                    zero = ((zword >> ((rows % PER_WORD) * BITS)) & MASK).to(tl.float32)
                else:
                    zero = OFFSET
                acc += scale * (dot - zero * xsum)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_ok, other=0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """x [..., K] @ dequant(W)ᵀ + b, without materialising W; rows of x are few (decode)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    n = layer.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    zero = layer.weight_zero_point if layer.weight_zero_point is not None else layer.weight_scale
    bias = layer.bias if layer.bias is not None else layer.weight_scale

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), m)

    _gemv_kernel[grid](
        x2, layer.weight_packed, layer.weight_scale, zero, bias, y,
        n, k, x2.stride(0), y.stride(0),
        BITS=layer.bits, GROUP=layer.group_size, HAS_ZERO=layer.weight_zero_point is not None,
        HAS_BIAS=layer.bias is not None,
    )
    return y.reshape(*shape[:-1], n)
