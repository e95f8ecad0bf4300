"""W4A16 / W8A16 for many rows (prefill) on CUDA, in Triton, from the checkpoint's packed layout.

Two ways to serve a prefill, chosen per layer shape and number of rows by timing (`QuantLinear`):

* `gemm`: one kernel that tiles x Wᵀ over (rows, outputs), loads each tile's packed words,
  unpacks them in registers and multiplies on tensor cores (`tl.dot`), so the weights are read at
  their packed size, once per row tile. Best for a few hundred rows, where a prefill is still
  bound by reading the weights.
* `dequant`: `dequantize` writes the 16-bit weight once (a bandwidth-bound kernel) and cuBLAS
  multiplies. Best for long prompts, where the multiply is bound by compute and cuBLAS is the
  fastest there is; the 16-bit copy lives for one layer's call.

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

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [
                (16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3),
                (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 128, 8, 3), (128, 128, 32, 8, 4),
            ]
        ],
        key=["M_BUCKET", "N", "K", "GROUP"],
    )
    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
        ks = tl.arange(0, BLOCK_K)
        groups = K // GROUP
        row_ok = rows < M
        col_ok = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        w_cols = w_ptr + cols[None, :].to(tl.int64) * (K // PER_WORD)
        for k0 in tl.range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0)
            words = tl.load(w_cols + (k // PER_WORD)[:, None], mask=col_ok[None, :] & (k < K)[:, None], other=0)
            q = ((words >> ((k % PER_WORD) * BITS)[:, None]) & MASK).to(tl.float32)  # [BLOCK_K, BLOCK_N]
            g = k // GROUP
            scale = tl.load(s_ptr + cols[None, :] * groups + g[:, None], mask=col_ok[None, :] & (k < K)[:, None], other=0)
            if HAS_ZERO:
                zword = tl.load(z_ptr + (cols // PER_WORD)[None, :] * groups + g[:, None],
                                mask=col_ok[None, :] & (k < K)[:, None], other=0)
                zero = ((zword >> ((cols % PER_WORD) * BITS)[None, :]) & MASK).to(tl.float32)
            else:
                zero = OFFSET
            w = ((q - zero) * scale.to(tl.float32)).to(a.dtype)
            acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def dequantize(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [N, K] in `dtype`, written once by one kernel."""
    n, k = layer.out_features, layer.in_features
    out = torch.empty(n, k, dtype=dtype, device=layer.weight_packed.device)
    zero = layer.weight_zero_point if layer.weight_zero_point is not None else layer.weight_scale
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _dequant_kernel[grid](layer.weight_packed, layer.weight_scale, zero, out, n, k, BITS=layer.bits, GROUP=layer.group_size,
                          HAS_ZERO=layer.weight_zero_point is not None, BLOCK_N=32, BLOCK_K=256)
    return out


def linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """x [..., K] @ dequant(W)ᵀ + b with the tiled kernel (many rows)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = layer.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    zero = layer.weight_zero_point if layer.weight_zero_point is not None else layer.weight_scale
    bias = layer.bias if layer.bias is not None else layer.weight_scale

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _gemm_kernel[grid](x2, layer.weight_packed, layer.weight_scale, zero, bias, y, m, n, k, x2.stride(0), y.stride(0),
                       triton.next_power_of_2(m), BITS=layer.bits, GROUP=layer.group_size,
                       HAS_ZERO=layer.weight_zero_point is not None, HAS_BIAS=layer.bias is not None)
    return y.reshape(*x.shape[:-1], n)
