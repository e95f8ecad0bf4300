"""A small ONNX graph writer: nodes by op name, weights as initializers, unique value names.

The exported graphs are written op by op from the model's own modules (weights read through the
adapter) rather than traced: every input and output has the name a runtime expects, the KV cache
is plain graph inputs and outputs, and W4A16 layers become ONNX Runtime's `MatMulNBits` with the
checkpoint's own integers, which no tracer emits. The ops are the standard ai.onnx set at opset
17 (plus `com.microsoft.MatMulNBits` for int4), so any ONNX runtime or compiler reads the float
graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelmm.errors import MissingExtraError

OPSET = 17
MS_DOMAIN = "com.microsoft"


def onnx_module() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("ONNX export", "onnx", "onnx") from None
    return onnx


def _numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        tensor = array.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return np.asarray(array)


def nbits_tensors(module: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A QuantLinear's weights in MatMulNBits' layout: B uint8 [N, blocks, block * bits / 8]
    (two 4-bit values a byte, the lower index in the low nibble), scales [N * blocks], and the
    zero points as unsigned bits-wide values packed likewise per row (None when symmetric: the
    runtime's default, 2^(bits-1), is a signed zero). The integers are the checkpoint's own."""
    from edgelmm.methods.quantization.packing import unpack, unpack_zero

    bits, group, n, k = module.bits, module.group_size, module.out_features, module.in_features
    q = unpack(module.weight_packed.cpu(), bits, k).numpy().astype(np.uint8).reshape(n, k // group, group)
    packed = q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q
    scales = _numpy(module.weight_scale).reshape(-1)
    if module.weight_zero_point is None:
        return packed, scales, None
    zeros = (unpack_zero(module.weight_zero_point.cpu(), bits, n).numpy().astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        zeros = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)))
        zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    return packed, scales, zeros.reshape(-1)


class Graph:
    """Build one ONNX graph; `op` returns the name of the value it made (or names, for several)."""

    def __init__(self, name: str, dtype: Any, int4: bool = False):
        self.onnx = onnx_module()
        self.int4 = int4  # W4A16 layers as MatMulNBits; else widened to the float type
        self.graph_name = name
        self.dtype = np.dtype(dtype)  # the activations' (and float weights') type
        self.elem = self.onnx.helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.domains = {"": OPSET}
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    # ------------------------------------------------------------ values
    def weight(self, array: Any, hint: str, dtype: Any = None) -> str:
        """An initializer from a numpy array or torch tensor, in the graph's float type unless
        `dtype` says otherwise (integers keep theirs)."""
        value = _numpy(array)
        if dtype is not None:
            value = value.astype(dtype)
        elif value.dtype.kind == "f":
            value = value.astype(self.dtype)
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared between uses."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(array, "const", dtype=array.dtype)
        return self._consts[key]

    def scalar(self, value: float) -> str:
        return self.const(value, self.dtype)

    def input(self, name: str, elem: Any, shape: list[Any]) -> str:
        elem_type = elem if isinstance(elem, int) else self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(elem))
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, value: str, elem: Any, shape: list[Any]) -> None:
        elem_type = elem if isinstance(elem, int) else self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(elem))
        self.op("Identity", value, out=name)
        self.outputs.append(self.onnx.helper.make_tensor_value_info(name, elem_type, shape))

    # ------------------------------------------------------------ nodes
    def op(self, op_type: str, *inputs: str | None, outputs: int = 1, out: str | None = None, domain: str = "",
           **attrs: Any) -> Any:
        names = [out] if out is not None else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, [i or "" for i in inputs], names, name=self.fresh(op_type),
                                                     domain=domain, **attrs))
        if domain and domain not in self.domains:
            self.domains[domain] = 1
        return names[0] if outputs == 1 else names

    def cast(self, value: str, dtype: Any) -> str:
        return self.op("Cast", value, to=self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    # ------------------------------------------------------------ layers
    def linear(self, x: str, module: Any, hint: str) -> str:
        """x Wᵀ + b for an nn.Linear, or ONNX Runtime's MatMulNBits for edgelmm's W4A16 QuantLinear
        (the checkpoint's integers, scales and zero points, repacked, never widened)."""
        quantized = hasattr(module, "weight_packed")
        if quantized and self.int4:
            y = self._matmul_nbits(x, module, hint)
        else:
            weight = module.dequantize() if quantized else module.weight.detach()
            y = self.op("MatMul", x, self.weight(weight.t(), hint))
        if getattr(module, "bias", None) is not None:
            y = self.op("Add", y, self.weight(module.bias, hint + ".bias"))
        return y

    def _matmul_nbits(self, x: str, module: Any, hint: str) -> str:
        packed, scales, zeros = nbits_tensors(module)
        inputs = [x, self.weight(packed, hint + ".qweight", np.uint8), self.weight(scales, hint + ".scales")]
        if zeros is not None:
            inputs.append(self.weight(zeros, hint + ".zeros", np.uint8))
        return self.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=module.in_features, N=module.out_features,
                       bits=module.bits, block_size=module.group_size)

    def rms_norm(self, x: str, module: Any, hint: str, offset: float = 0.0) -> str:
        """RMSNorm as transformers computes it: in float32, then the weight in the model's type."""
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        h = self.cast(x, np.float32) if self.dtype != np.float32 else x
        # Pow, ReduceMean, Add, Sqrt, Div: the pattern onnxruntime fuses into one SimplifiedLayerNormalization
        variance = self.op("ReduceMean", self.op("Pow", h, self.const(2.0, np.float32)), axes=[-1], keepdims=1)
        h = self.op("Div", h, self.op("Sqrt", self.op("Add", variance, self.const(eps, np.float32))))
        if self.dtype != np.float32:
            h = self.cast(h, self.dtype)
        weight = module.weight.detach().float() + offset
        return self.op("Mul", h, self.weight(weight, hint))

    def layer_norm(self, x: str, module: Any, hint: str) -> str:
        return self.op("LayerNormalization", x, self.weight(module.weight, hint), self.weight(module.bias, hint + ".bias"),
                       axis=-1, epsilon=float(module.eps))

    def activation(self, x: str, name: str) -> str:
        if name in ("silu", "swish"):
            return self.op("Mul", x, self.op("Sigmoid", x))
        if name == "quick_gelu":
            return self.op("Mul", x, self.op("Sigmoid", self.op("Mul", x, self.scalar(1.702))))
        if name == "gelu":  # the exact (erf) GELU
            erf = self.op("Erf", self.op("Div", x, self.scalar(2**0.5)))
            return self.op("Mul", self.op("Mul", x, self.scalar(0.5)), self.op("Add", erf, self.scalar(1.0)))
        if name in ("gelu_pytorch_tanh", "gelu_new"):
            inner = self.op("Mul", self.op("Add", x, self.op("Mul", self.op("Mul", self.op("Mul", x, x), x), self.scalar(0.044715))),
                            self.scalar((2 / np.pi) ** 0.5))
            return self.op("Mul", self.op("Mul", x, self.scalar(0.5)), self.op("Add", self.op("Tanh", inner), self.scalar(1.0)))
        raise ValueError(name)

    def softmax(self, x: str) -> str:
        """Softmax over the last axis, in float32 (as transformers' eager attention does)."""
        if self.dtype == np.float32:
            return self.op("Softmax", x, axis=-1)
        return self.cast(self.op("Softmax", self.cast(x, np.float32), axis=-1), self.dtype)

    # ------------------------------------------------------------ attention (language model and vision towers)
    def heads(self, x: str, heads: int, head_dim: int) -> str:
        """[batch, sequence, heads * head_dim] -> [batch, heads, sequence, head_dim]."""
        return self.op("Transpose", self.op("Reshape", x, self.const([0, 0, heads, head_dim])), perm=[0, 2, 1, 3])

    def rotary(self, x: str, cos: str, sin: str, head_dim: int) -> str:
        """x cos + rotate_half(x) sin over [batch, heads, sequence, head_dim], as transformers rotates."""
        half = head_dim // 2
        first = self.op("Slice", x, self.const([0]), self.const([half]), self.const([3]))
        second = self.op("Slice", x, self.const([half]), self.const([head_dim]), self.const([3]))
        rotated = self.op("Concat", self.op("Neg", second), first, axis=3)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", rotated, sin))

    def attention(self, q: str, k: str, v: str, scale: float, width: int, allowed: str | None = None) -> str:
        """softmax(q kᵀ scale) v over [batch, heads, sequence, head_dim], where `allowed` (a bool mask
        broadcast over the scores) lets it look, back to [batch, sequence, width]."""
        scores = self.op("Mul", self.op("MatMul", q, self.op("Transpose", k, perm=[0, 1, 3, 2])), self.scalar(scale))
        if allowed is not None:
            scores = self.op("Where", allowed, scores, self.scalar(float(np.finfo(self.dtype).min)))
        out = self.op("MatMul", self.softmax(scores), v)
        return self.op("Reshape", self.op("Transpose", out, perm=[0, 2, 1, 3]), self.const([0, 0, width]))

    # ------------------------------------------------------------ the model
    def model(self, producer: str = "edgelmm") -> Any:
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, self.graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid(domain, version) for domain, version in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = 8  # ONNX 1.10+: read by every onnxruntime since 1.10 and by TensorRT
        return model


ACTIVATIONS = ("silu", "swish", "quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")
