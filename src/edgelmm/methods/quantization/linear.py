"""The W4A16 / W8A16 linear layer: packed integer weights in memory, 16-bit activations.

The module holds exactly what a compressed-tensors pack-quantized checkpoint holds
(`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_shape`), so saving is its state
dict and loading is `load_state_dict`, and the model's resident bytes are those of the packed
tensors. `forward` picks the fastest path the machine has, at run time:

* CUDA with Triton, few rows (decode, up to FUSED_MAX_ROWS): a fused Triton GEMV that reads the
  checkpoint's packed words and never materialises them in 16-bit (`kernel.py`: a split-K kernel
  for 4-bit, "splitk", and the older one-program-per-rows kernel, "triton");
* CUDA with Triton, more rows (prefill): `dequant.py`'s one-kernel dequantize to the
  activation dtype, then cuBLAS;
* otherwise (CPU, no Triton): dequantize to the activation dtype and matmul, so the 16-bit
  weight exists only for the duration of one layer's call;
* on request only (`set_cuda_kernel("tinygemm")`; 4-bit, bfloat16 scales, sm80+): torch's int4
  tensor-core kernel ("tinygemm", `tinygemm.py`), whose tiled layout *replaces* the checkpoint
  tensors on the device and then serves every call, prefill included, where it is far slower than
  cuBLAS; `state_dict()` still rebuilds the checkpoint tensors exactly.

`set_cuda_kernel("auto" | "tinygemm" | "splitk" | "triton")` picks the decode kernel: "auto"
(the default) checks and times the packed-layout kernels on each new layer shape at batch 1
(CUDA-graph replays) and keeps the fastest correct one. `kernel_choices()` tells what was chosen
for decode, with the times and errors: no kernel is used silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import edgelmm.methods.quantization.packing as packing
import edgelmm.methods.quantization.tinygemm as tinygemm

# Above this many rows a GPU matmul on the dequantized weight beats the GEMV kernel (the weight
# is read once either way and cuBLAS is better at large tiles).
FUSED_MAX_ROWS = 16
CUDA_KERNELS = ("auto", "tinygemm", "splitk", "triton")
_cuda_kernel = "auto"
_choices: dict[tuple, dict] = {}  # (out, in, bits, group, symmetric, device) -> {"kernel", "us", "rel_err"}


def set_cuda_kernel(name: str) -> None:
    """Which kernel serves QuantLinear on CUDA from now on (layers already prepared keep theirs
    until `prepare` is called again)."""
    global _cuda_kernel
    if name not in CUDA_KERNELS:
        raise ValueError(f"unknown CUDA kernel {name!r}; choose one of {CUDA_KERNELS}")
    _cuda_kernel = name


def kernel_choices() -> dict[tuple, dict]:
    """What "auto" chose per layer shape: {(out, in, bits, group, symmetric, device): {"kernel", "us", "rel_err"}}."""
    return dict(_choices)


def _may_change_layout() -> bool:
    """Not while torch.compile traces or a CUDA graph is being captured."""
    compiling = torch.compiler.is_compiling()
    return not compiling and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W = (q - zero) * scale per group of `group_size` input channels."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        per_word = 32 // bits
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // per_word, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            rows = -(-out_features // per_word)
            self.register_buffer("weight_zero_point", torch.zeros(rows, groups, dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # the tinygemm layout, made at run time (never saved: state_dict writes the checkpoint tensors)
        self.register_buffer("tinygemm_weight", None, persistent=False)
        self.register_buffer("tinygemm_scales_zeros", None, persistent=False)
        self._settled = False  # whether the CUDA kernel for this layer has been chosen
        self._cuda_choice = "triton"  # of "tinygemm", "splitk", "triton", "dequant"

    @classmethod
    def from_quantized(cls, qw: packing.QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
        out_features, in_features = qw.q.shape
        layer = cls(in_features, out_features, qw.bits, qw.group_size, qw.zero is None, bias is not None, dtype, qw.q.device)
        layer.weight_packed.copy_(packing.pack_weight(qw.q, qw.bits))
        layer.weight_scale.copy_(qw.scale)
        if qw.zero is not None:
            layer.weight_zero_point.copy_(packing.pack_zero(qw.zero, qw.bits))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool) -> QuantLinear:
        """Round-to-nearest quantization of a float linear layer (scales in its dtype)."""
        dtype = linear.weight.dtype
        qw = packing.quantize(linear.weight.detach(), bits, group_size, symmetric, dtype)
        return cls.from_quantized(qw, linear.bias, dtype)

    # ------------------------------------------------------------ weights
    @property
    def layout(self) -> str:
        """"packed" (the checkpoint's tensors) or "tinygemm" (torch's int4 tiles, which replace them)."""
        return "tinygemm" if self.tinygemm_weight is not None else "packed"

    def int_weight(self) -> packing.QuantizedWeight:
        """The signed integers, scales and zero points, unpacked (for conversion and tests)."""
        if self.layout == "tinygemm":
            q, scale, zero = tinygemm.unpack(self.tinygemm_weight, self.tinygemm_scales_zeros, self.group_size, self.in_features)
            q = (q - 2 ** (self.bits - 1)).to(torch.int8)
            return packing.QuantizedWeight(q, scale, None if self.symmetric else zero, self.bits, self.group_size)
        q = packing.unpack_weight(self.weight_packed, self.bits, self.in_features)
        zero = None
        if self.weight_zero_point is not None:
            zero = packing.unpack_zero(self.weight_zero_point, self.bits, self.out_features)
        return packing.QuantizedWeight(q, self.weight_scale, zero, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.int_weight().dequantize(dtype)

    def to_tinygemm(self, _made: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Replace the checkpoint tensors on the device by torch's int4 layout (see `tinygemm.py`)."""
        if self.layout == "tinygemm":
            return
        reason = tinygemm.unsupported(self, self.weight_packed.device)
        if reason is not None:
            raise ValueError(f"the int4 tensor-core kernel cannot serve this layer: {reason}")
        packed, sz = _made if _made is not None else self._tinygemm_tensors()
        self.tinygemm_weight, self.tinygemm_scales_zeros = packed, sz
        self.weight_packed = self.weight_scale = None
        if not self.symmetric:
            self.weight_zero_point = None

    def to_packed(self) -> None:
        """Back to the checkpoint tensors (exactly the ones `to_tinygemm` replaced)."""
        if self.layout == "packed":
            return
        qw = self.int_weight()
        self.weight_packed = packing.pack_weight(qw.q, self.bits)
        self.weight_scale = qw.scale
        if not self.symmetric:
            self.weight_zero_point = packing.pack_zero(qw.zero, self.bits)
        self.tinygemm_weight = self.tinygemm_scales_zeros = None
        self._settled = False

    def _tinygemm_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        tiles = tinygemm.inner_k_tiles(self.in_features)
        chunks = []
        for r in range(0, self.out_features, 4096):  # bounded int32 temporaries for wide layers (lm_head)
            q = packing.unpack(self.weight_packed[r : r + 4096], self.bits, self.in_features)
            chunks.append(tinygemm.pack(q, tiles))
        packed = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        zero = None if self.symmetric else packing.unpack_zero(self.weight_zero_point, self.bits, self.out_features)
        return packed, tinygemm.scales_and_zeros(self.weight_scale, zero)

    # ------------------------------------------------------------ state dict and moves
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "tinygemm":  # the checkpoint format, rebuilt exactly
            qw = self.int_weight()
            destination[prefix + "weight_packed"] = packing.pack_weight(qw.q, self.bits)
            destination[prefix + "weight_scale"] = qw.scale
            if not self.symmetric:
                destination[prefix + "weight_zero_point"] = packing.pack_zero(qw.zero, self.bits)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        self.to_packed()
        self._settled = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        # the tiles are device-specific and bfloat16: leave them before a move or a dtype change
        if self.layout == "tinygemm":
            weight, sz = fn(self.tinygemm_weight[:0]), fn(self.tinygemm_scales_zeros[:0])
            if weight.device != self.tinygemm_weight.device or sz.dtype != torch.bfloat16:
                self.to_packed()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------ compute
    def settle(self, device: torch.device, kernel: str | None = None) -> str:
        """Choose this layer's CUDA kernel and give the layer its layout; returns the kernel
        ("tinygemm", "splitk", "triton", or "dequant" when none applies)."""
        import edgelmm.methods.quantization.kernel as triton_kernel

        kernel = kernel or _cuda_kernel
        self._settled = True
        if kernel == "auto":
            key = (self.out_features, self.in_features, self.bits, self.group_size, self.symmetric, str(device))
            if key not in _choices:
                self.to_packed()
                _choices[key] = self._time_kernels(device)
            kernel = _choices[key]["kernel"]
        if kernel == "tinygemm" and tinygemm.unsupported(self, device) is None:
            self.to_tinygemm()
        else:
            self.to_packed()
            if kernel in ("tinygemm", "splitk") and not triton_kernel.splitk_available(self):
                kernel = "triton"
            elif kernel == "tinygemm":
                kernel = "splitk"
            if kernel == "triton" and not triton_kernel.available(self):
                kernel = "dequant"
        self._cuda_choice, self._settled = kernel, True
        return kernel

    def _time_kernels(self, device: torch.device) -> dict:
        """Median µs of each applicable kernel at batch 1 (CUDA-graph replays, so launch overhead
        is out), after checking its output against dequantize + matmul; the fastest correct wins."""
        import edgelmm.methods.quantization.kernel as triton_kernel

        x = torch.randn(1, self.in_features, device=device, dtype=torch.bfloat16)
        runs = {}
        if triton_kernel.available(self):
            runs["triton"] = lambda: triton_kernel.linear(x, self)
        if triton_kernel.splitk_available(self):
            runs["splitk"] = lambda: triton_kernel.linear_splitk(x, self)
        if len(runs) <= 1:
            return {"kernel": next(iter(runs), "dequant"), "us": {}, "rel_err": {}}
        from triton.testing import do_bench_cudagraph

        reference = F.linear(x.float(), self.dequantize(torch.float32), None if self.bias is None else self.bias.float())
        us, errors = {}, {}
        for name, run in runs.items():
            y = run()  # also Triton's autotuning, outside the graph
            errors[name] = float((y.float() - reference).norm() / reference.norm())
            if not errors[name] < 2e-2:  # bfloat16 output rounding is ~4e-3
                continue
            torch.cuda.synchronize(device)
            us[name] = do_bench_cudagraph(run, rep=20, return_mode="median") * 1e3
        return {"kernel": min(us, key=us.get) if us else "dequant", "us": us, "rel_err": errors}

    def _tinygemm_linear(self, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = tinygemm.mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), packed, self.group_size, sz)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not self._settled and _may_change_layout():
            self.settle(x.device)
        if self.layout == "tinygemm":
            return self._tinygemm_linear(x, self.tinygemm_weight, self.tinygemm_scales_zeros)
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and rows <= FUSED_MAX_ROWS:
            import edgelmm.methods.quantization.kernel as kernel

            if self._cuda_choice == "splitk" and kernel.splitk_available(self):
                return kernel.linear_splitk(x, self)
            if self._cuda_choice != "dequant" and kernel.available(self):
                return kernel.linear(x, self)
        elif x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            import edgelmm.methods.quantization.dequant as dequant

            if dequant.available(self):
                return F.linear(x, dequant.dequantize(self, x.dtype), self.bias)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        zero = "sym" if self.symmetric else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {zero}, bias={self.bias is not None}, layout={self.layout}")


def prepare(model: nn.Module, kernel: str | None = None) -> dict[str, int]:
    """Choose the CUDA kernel of every QuantLinear on a CUDA device and give it that kernel's
    layout, once, after loading or quantizing (forward does it lazily otherwise, which
    torch.compile and CUDA-graph capture cannot). Returns the number of layers per kernel."""
    if kernel is not None and kernel not in CUDA_KERNELS:
        raise ValueError(f"unknown CUDA kernel {kernel!r}; choose one of {CUDA_KERNELS}")
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            device = (module.tinygemm_weight if module.layout == "tinygemm" else module.weight_packed).device
            if device.type == "cuda":
                chosen = module.settle(device, kernel)
                counts[chosen] = counts.get(chosen, 0) + 1
    return counts


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, each storage counted once.

    Storages, not tensor sizes: a view or a tied weight (embeddings shared with lm_head) costs
    its storage once, and a tensor that keeps a larger storage alive costs all of it. That is
    what stays resident, so it is the number to compare before and after quantization.
    """
    seen: dict[tuple[str, int], int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
