"""W4A16 vs bf16 on one CUDA GPU: kernel correctness, weight memory and batch-1 decode speed.

A Qwen2.5-7B-shaped model (the real config, random bf16 weights: speed does not depend on the
values) is timed with one decode loop for both variants: a static KV cache and one step per
token that calls the transformers model's own modules in order (so bf16 linears are cuBLAS and
quantized ones are `QuantLinear`, i.e. the Triton GEMV kernel), with torch's fused `F.rms_norm`
for the norms (same weights and epsilon; fewer launches for both variants), captured once in a
CUDA graph (greedy argmax and the position update are inside the graph, so replays run back to
back) and, for reference, run eagerly. Per-token time = (time of N replays) / N with CUDA
events, median over repeats.

    PYTHONPATH=src python benchmarks/quantization/gpu_decode.py --out results/   # on the GPU
    PYTHONPATH=src python benchmarks/quantization/gpu_decode.py --tiny --device cpu  # loop check on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from edgelmm.methods.quantization import QuantLinear, RTNConfig, quantize, weight_bytes
from edgelmm.models.causal_lm import CausalLMAdapter

CONFIG = Path(__file__).resolve().parents[2] / "tests/fixtures/configs/Qwen2.5-7B-Instruct/config.json"
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)


class StaticDecoder:
    """Batch-1 greedy decode with a preallocated KV cache; `step` has no host synchronisation,
    so it can be captured in a CUDA graph."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        self.model, self.max_len = model, max_len
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        device, dtype = model.model.norm.weight.device, model.model.norm.weight.dtype
        shape = (cfg.num_hidden_layers, 1, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] of `token` at position `pos`, writing its K/V into the cache."""
        m = self.model.model

        def norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)

        h = m.embed_tokens(token).view(1, 1, -1)
        cos, sin = m.rotary_emb(h, pos.view(1, 1))
        mask = (self.slots <= pos).view(1, 1, 1, -1)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = norm(layer.input_layernorm, h)
            q = attn.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=True)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(norm(layer.post_attention_layernorm, h))
        return self.model.lm_head(norm(m.norm, h)).view(1, -1)

    def step(self) -> torch.Tensor:
        """One greedy step from the state buffers (token, pos), advancing them in place."""
        logits = self.forward(self.token, self.pos)
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def reset(self, token: int) -> None:
        self.token.fill_(token)
        self.pos.zero_()


def time_decode(decoder: StaticDecoder, steps: int, repeats: int, graph: bool) -> list[float]:
    """Seconds per token, one value per repeat (each: `steps` tokens from position 0)."""
    device = decoder.token.device
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            decoder.reset(1)
            start = time.perf_counter()
            for _ in range(steps):
                decoder.step()
            times.append((time.perf_counter() - start) / steps)
        return times
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton autotuning and cuBLAS handles, outside capture
        decoder.reset(1)
        for _ in range(3):
            decoder.step()
    torch.cuda.current_stream().wait_stream(stream)
    run = decoder.step
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        decoder.reset(1)
        with torch.cuda.graph(cuda_graph):
            decoder.step()
        run = cuda_graph.replay
    times = []
    for _ in range(repeats):
        decoder.reset(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / steps)
    return times


def check_loop(model: torch.nn.Module, decoder: StaticDecoder, n: int = 8) -> float:
    """Relative error of the static loop's logits against the transformers forward, n tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=decoder.token.device)
    reference = model(input_ids=ids).logits[0].float()
    decoder.reset(0)
    ours = []
    for t in range(n):
        decoder.pos.fill_(t)
        ours.append(decoder.forward(ids[0, t : t + 1], decoder.pos).float())
    ours = torch.cat(ours)
    return float((ours - reference).norm() / reference.norm())


def check_kernel(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """QuantLinear's forward (the Triton kernel on CUDA) against dequantize + matmul in float64."""
    rows = []
    shapes = [(3584, 512, 1), (3584, 18944, 1), (18944, 3584, 16), (3584, 3584, 4)]
    for bits, symmetric in [(4, False), (4, True), (8, False)]:
        for k, n, m in shapes[:2] if bits == 8 else shapes:
            linear = torch.nn.Linear(k, n, bias=n == 512, device=device, dtype=dtype)
            layer = QuantLinear.from_linear(linear, bits, 128, symmetric)
            x = torch.randn(m, k, device=device, dtype=dtype)
            reference = F.linear(x.double(), layer.dequantize(torch.float64), None if layer.bias is None else layer.bias.double())
            y = layer(x).double()
            err = float((y - reference).norm() / reference.norm())
            rows.append({"bits": bits, "symmetric": symmetric, "K": k, "N": n, "M": m, "rel_err": err, "finite": bool(torch.isfinite(y).all())})
            del linear, layer
    return rows


def bench_kernel(device: torch.device) -> list[dict]:
    """Median microseconds (CUDA-graph replays, so launch overhead is out): bf16 F.linear (cuBLAS)
    vs the W4A16 kernel, batch 1, Qwen2.5-7B shapes."""
    from triton.testing import do_bench_cudagraph

    rows = []
    for k, n in [(3584, 4608), (3584, 3584), (3584, 18944), (18944, 3584), (3584, 152064)]:
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        layer = QuantLinear.from_linear(linear, 4, 128, False)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        layer(x)  # autotune outside the graph
        bf16_us = do_bench_cudagraph(lambda x=x, w=linear.weight: F.linear(x, w), rep=100, return_mode="median") * 1e3
        w4_us = do_bench_cudagraph(lambda x=x, layer=layer: layer(x), rep=100, return_mode="median") * 1e3
        bytes_bf16, bytes_w4 = weight_bytes(linear), weight_bytes(layer)
        from edgelmm.methods.quantization import kernel

        best = next((str(c) for key, c in kernel._gemv_kernel.cache.items() if key[:2] == (n, k)), None)
        rows.append({"K": k, "N": n, "bf16_us": bf16_us, "w4a16_us": w4_us, "speedup": bf16_us / w4_us,
                     "bf16_GBs": bytes_bf16 / bf16_us / 1e3, "w4a16_GBs": bytes_w4 / w4_us / 1e3, "config": best})
        del linear, layer
    return rows


def allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device)


def measure(model: torch.nn.Module, decoder: StaticDecoder, device: torch.device, steps: int, repeats: int, base: int) -> dict:
    """Weight bytes, allocated bytes and decode speed: CUDA graph (the number to report) and a
    short eager run (launch-bound, for reference)."""
    result = {"weight_bytes": weight_bytes(model), "allocated_bytes": None}
    caches = decoder.k.untyped_storage().nbytes() + decoder.v.untyped_storage().nbytes()
    if (total := allocated(device)) is not None:
        result["allocated_bytes"] = total - base - caches  # the model's own allocations
    modes = [("graph", True, steps, repeats), ("eager", False, 16, 2)] if device.type == "cuda" else [("eager", False, steps, repeats)]
    for mode, graph, n, r in modes:
        times = time_decode(decoder, n, r, graph)
        result[f"{mode}_s_per_token"] = statistics.median(times)
        result[f"{mode}_tok_s"] = 1 / statistics.median(times)
        result[f"{mode}_all_s_per_token"] = times
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (checking the loop)")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    report: dict = {"torch": torch.__version__, "platform": platform.platform(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        import triton

        report["triton"] = triton.__version__
        report["kernel_check"] = check_kernel(device, dtype)
        report["kernel_bench"] = bench_kernel(device)
    config = AutoConfig.from_pretrained(CONFIG.parent)
    if args.tiny:
        config.update(TINY)
    base = allocated(device) or 0
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    adapter = CausalLMAdapter(model, None)
    torch.set_grad_enabled(False)
    decoder = StaticDecoder(model, max_len=args.steps + 16)
    report["loop_vs_transformers_rel_err"] = {"bf16": check_loop(model, decoder)}
    report["bf16"] = measure(model, decoder, device, args.steps, args.repeats, base)
    reference_logits = decoder.forward(torch.tensor([1], device=device), torch.tensor([0], device=device)).float()
    started = time.perf_counter()
    quantize(model, adapter, RTNConfig(bits=4, group_size=128), progress=False)
    report["quantize_s"] = time.perf_counter() - started
    report["loop_vs_transformers_rel_err"]["w4a16"] = check_loop(model, decoder)
    w4_logits = decoder.forward(torch.tensor([1], device=device), torch.tensor([0], device=device)).float()
    report["w4a16_vs_bf16_logits_rel_err"] = float((w4_logits - reference_logits).norm() / reference_logits.norm())
    report["w4a16"] = measure(model, decoder, device, args.steps, args.repeats, base)
    quantize(model, adapter, RTNConfig(bits=4, group_size=128, extra=("lm_head",)), progress=False)
    report["w4a16_lm_head"] = measure(model, decoder, device, args.steps, args.repeats, base)
    bf16 = report["bf16"]
    lines = [f"device: {report['device']}  torch {torch.__version__}", "variant          weight GB  x bf16  alloc GB  graph tok/s  eager tok/s"]
    for name in ("bf16", "w4a16", "w4a16_lm_head"):
        r = report[name]
        alloc = "-" if r["allocated_bytes"] is None else f"{r['allocated_bytes'] / 1e9:.2f}"
        lines.append(f"{name:15s} {r['weight_bytes'] / 1e9:9.2f}  {r['weight_bytes'] / bf16['weight_bytes']:6.3f}  {alloc:>8s}"
                     f"  {r.get('graph_tok_s', float('nan')):11.1f}  {r['eager_tok_s']:11.1f}")
    if "kernel_check" in report:
        lines.append(f"kernel max rel err vs dequant+matmul (fp64): {max(r['rel_err'] for r in report['kernel_check']):.2e}")
        lines += [f"  K={r['K']:5d} N={r['N']:6d}: bf16 {r['bf16_us']:7.1f} us ({r['bf16_GBs']:.0f} GB/s)  w4a16 {r['w4a16_us']:7.1f} us ({r['w4a16_GBs']:.0f} GB/s)  x{r['speedup']:.2f}  {r['config']}"
                  for r in report["kernel_bench"]]
    lines.append(f"loop vs transformers rel err: {report['loop_vs_transformers_rel_err']}")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_decode.json").write_text(json.dumps(report, indent=2))
        (args.out / "gpu_decode.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
