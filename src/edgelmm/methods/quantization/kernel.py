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

A second kernel, `_splitk_kernel` (4-bit only), is built for bandwidth instead: programs run over
(BLOCK_N rows, one of SPLIT_K chunks of the input dimension), so even a tall-K layer has
hundreds of programs with few sequential steps each. It never reduces inside its loop and never
converts integers with I2F: nibble j of every word is moved into the mantissa of 1.0
(`(w << (19 - 4j)) & 0x780000 | 0x3F800000` read as a float is 1 + u/16), so per weight it costs
a shift, one bitwise op and one FMA on a [BLOCK_N, words-of-a-group] tile in the load's own
register layout; x is read per nibble lane (stride 8), shared by the rows a thread holds. Per
group, `a = Σ_j (1 + u_j/16) x_j` and `xs = Σ_j x_j` give `Σ_j (u_j - z) x_j · s = 16 s a - s (16 + z) xs`
(unsigned u and z). Partial sums of the SPLIT_K programs of a row block meet in a float32
workspace by atomic add; the last of them to arrive (an atomic counter) reads the sum, zeroes
the workspace and the counter for the next call, adds the bias and writes the 16-bit output, so
one launch does it all and nothing needs clearing between calls. The workspace is shared per
device, so calls on one device must not run concurrently (one stream, as in decode).

Imported only on CUDA; `available` / `splitk_available` say whether a kernel can serve a layer.
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
    return (triton is not None and layer.weight_packed is not None and group <= 256 and group & (group - 1) == 0
            and layer.weight_packed.is_contiguous())


def splitk_available(layer: torch.nn.Module) -> bool:
    """The split-K kernel: 4-bit, a group of 32 to 256 input channels (a power of two)."""
    return available(layer) and layer.bits == 4 and layer.group_size >= 32


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


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
            for bn, sk, w, st in [
                (16, 1, 2, 4), (32, 1, 4, 4), (16, 2, 2, 4), (32, 2, 4, 4), (32, 4, 4, 4),
                (64, 4, 4, 3), (32, 8, 4, 3), (64, 8, 4, 3), (32, 16, 4, 3), (128, 8, 8, 3),
            ]
        ],
        key=["N", "K", "GROUP"],
    )
    @triton.jit
    def _splitk_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        N, K, stride_xm, stride_ym,
        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        WORDS: tl.constexpr = GROUP // 8
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        n_blocks = tl.num_programs(0)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        groups = K // GROUP
        k_words = K // 8
        per_split = tl.cdiv(groups, SPLIT_K)
        g_start = pid_k * per_split
        g_end = tl.minimum(g_start + per_split, groups)
        words = tl.arange(0, WORDS)
        x_row = x_ptr + m * stride_xm
        w_rows = w_ptr + rows[:, None].to(tl.int64) * k_words
        acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        for g in tl.range(g_start, g_end):
            kw = g * WORDS + words
            packed = tl.load(w_rows + kw[None, :], mask=row_ok[:, None], other=0)
            a = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
            xs = tl.zeros([WORDS], dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_row + kw * 8 + j).to(tl.float32)
                if 4 * j <= 19:
                    bits = packed << (19 - 4 * j)
                else:
                    bits = packed >> (4 * j - 19)
                f = ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + u_j / 16
                a += f * xj[None, :]
                xs += xj
            scale = tl.load(s_ptr + rows * groups + g, mask=row_ok, other=0).to(tl.float32)
            if HAS_ZERO:
                zword = tl.load(z_ptr + (rows // 8) * groups + g, mask=row_ok, other=0)
                zero = ((zword >> ((rows % 8) * 4)) & 0xF).to(tl.float32)
            else:
                zero = tl.full([BLOCK_N], 8.0, tl.float32)
            acc += (16.0 * scale)[:, None] * a - (scale * (16.0 + zero))[:, None] * xs[None, :]
        part = tl.sum(acc, axis=1)
        if SPLIT_K == 1:
            if HAS_BIAS:
                part += tl.load(b_ptr + rows, mask=row_ok, other=0).to(tl.float32)
            tl.store(y_ptr + m * stride_ym + rows, part.to(y_ptr.dtype.element_ty), mask=row_ok)
        else:
            tl.atomic_add(ws_ptr + m * N + rows, part, mask=row_ok)
            tl.debug_barrier()  # every thread's partial is in before the block says it is done
            arrived = tl.atomic_add(cnt_ptr + m * n_blocks + pid_n, 1)
            if arrived == SPLIT_K - 1:  # the last program of this row block finishes it
                ws_bits = (ws_ptr + m * N + rows).to(tl.pointer_type(tl.int32))  # read and clear at L2, as bits
                total = tl.atomic_xchg(ws_bits, tl.zeros([BLOCK_N], dtype=tl.int32), mask=row_ok).to(tl.float32, bitcast=True)
                if HAS_BIAS:
                    total += tl.load(b_ptr + rows, mask=row_ok, other=0).to(tl.float32)
                tl.store(y_ptr + m * stride_ym + rows, total.to(y_ptr.dtype.element_ty), mask=row_ok)
                tl.atomic_xchg(cnt_ptr + m * n_blocks + pid_n, 0)


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed float32 partial sums and arrival counters (the kernel leaves them zeroed)."""
    ws, counters = _workspaces.get(device, (None, None))
    need_ws, need_counters = m * n, m * triton.cdiv(n, 16)  # 16: the smallest BLOCK_N
    if ws is None or ws.numel() < need_ws or counters.numel() < need_counters:
        size = max(need_ws, 0 if ws is None else ws.numel())
        count = max(need_counters, 0 if counters is None else counters.numel())
        ws = torch.zeros(size, dtype=torch.float32, device=device)
        counters = torch.zeros(count, dtype=torch.int32, device=device)
        _workspaces[device] = (ws, counters)
    return ws, counters


def _operands(x: torch.Tensor, layer: torch.nn.Module):
    """What both launchers pass: x as [M, K] rows, the output [M, N], and stand-in pointers for an
    absent zero point or bias (the kernels skip them by their HAS_* flags)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    zero = layer.weight_zero_point if layer.weight_zero_point is not None else layer.weight_scale
    bias = layer.bias if layer.bias is not None else layer.weight_scale
    return x2, y, zero, bias


def linear_splitk(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """`linear` with the split-K kernel (4-bit layers)."""
    x2, y, zero, bias = _operands(x, layer)
    (m, k), n = x2.shape, layer.out_features
    ws, counters = _workspace(x.device, m, n)

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)

    _splitk_kernel[grid](
        x2, layer.weight_packed, layer.weight_scale, zero, bias, y, ws, counters,
        n, k, x2.stride(0), y.stride(0),
        GROUP=layer.group_size, HAS_ZERO=layer.weight_zero_point is not None, HAS_BIAS=layer.bias is not None,
    )
    return y.reshape(*x.shape[:-1], n)


def linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """x [..., K] @ dequant(W)ᵀ + b, without materialising W; rows of x are few (decode)."""
    x2, y, zero, bias = _operands(x, layer)
    (m, k), n = x2.shape, layer.out_features

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), m)

    _gemv_kernel[grid](
        x2, layer.weight_packed, layer.weight_scale, zero, bias, y,
        n, k, x2.stride(0), y.stride(0),
        BITS=layer.bits, GROUP=layer.group_size, HAS_ZERO=layer.weight_zero_point is not None,
        HAS_BIAS=layer.bias is not None,
    )
    return y.reshape(*x.shape[:-1], n)
