"""W4A16 vs bf16 on one CUDA GPU: kernel correctness, weight memory and batch-1 decode speed.

A Qwen2.5-7B-shaped model (the real config, random bf16 weights: speed does not depend on the
values) is timed with one decode loop for both variants: a static KV cache and one step per
token that calls the transformers model's own modules in order (so bf16 linears are cuBLAS and
quantized ones are `QuantLinear`, i.e. whichever CUDA kernel `prepare` chose per layer shape:
torch's int4 tensor-core kernel "tinygemm", or one of the Triton GEMVs), with torch's fused
`F.rms_norm` for the norms (same weights and epsilon; fewer launches for both variants).
Two loops, each captured once in a CUDA graph (greedy argmax and the position update are inside
the graph, so replays run back to back):

* "graph": the step as eager modules;
* "compiled": the same step through `torch.compile` (inductor fuses norms, rope, residual adds
  and small ops; the linears stay cuBLAS / QuantLinear's kernels), then captured the same way.

Plus, for reference, a short eager run. Per-token time = (time of N replays) / N with CUDA
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

from edgelmm.methods.quantization import (
    QuantLinear,
    RTNConfig,
    kernel_choices,
    prepare,
    quantize,
    weight_bytes,
)
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
        self.fwd = self.forward  # what `step` calls: the eager forward or a compiled one

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
        logits = self.fwd(self.token, self.pos)
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


KERNELS = ("triton", "splitk", "tinygemm")


def forced(linear: torch.nn.Linear, bits: int, symmetric: bool, kernel: str) -> tuple[QuantLinear, str]:
    """A QuantLinear of `linear` served by `kernel` (or by what serves it when that one can't)."""
    layer = QuantLinear.from_linear(linear, bits, 128, symmetric)
    return layer, layer.settle(linear.weight.device, kernel)


def check_kernel(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every CUDA kernel's QuantLinear forward against dequantize + matmul in float64."""
    rows = []
    shapes = [(3584, 512, 1), (3584, 18944, 1), (18944, 3584, 16), (3584, 3584, 4)]
    for bits, symmetric in [(4, False), (4, True), (8, False)]:
        for k, n, m in shapes[:2] if bits == 8 else shapes:
            linear = torch.nn.Linear(k, n, bias=n == 512, device=device, dtype=dtype)
            x = torch.randn(m, k, device=device, dtype=dtype)
            checkpoint = QuantLinear.from_linear(linear, bits, 128, symmetric).state_dict()
            for name in KERNELS if bits == 4 else ("triton",):
                try:
                    layer, used = forced(linear, bits, symmetric, name)
                    reference = F.linear(x.double(), layer.dequantize(torch.float64), None if layer.bias is None else layer.bias.double())
                    y = layer(x).double()
                    again = layer(x).double()  # the split-K kernel must leave its workspace clean
                    err = float((y - reference).norm() / reference.norm())
                    state = layer.state_dict()  # rebuilt from the tiles for tinygemm: must be the checkpoint's
                    exact = state.keys() == checkpoint.keys() and all(torch.equal(state[key], v) for key, v in checkpoint.items())
                    rows.append({"kernel": used, "bits": bits, "symmetric": symmetric, "K": k, "N": n, "M": m, "rel_err": err,
                                 "repeat_equal": float((again - y).norm() / reference.norm()) < 1e-2,  # atomics: order varies
                                 "state_dict_exact": exact,
                                 "finite": bool(torch.isfinite(y).all())})
                    del layer
                except Exception as error:  # noqa: BLE001 - reported, the run goes on
                    rows.append({"kernel": name, "bits": bits, "symmetric": symmetric, "K": k, "N": n, "M": m, "error": repr(error)[:500]})
            del linear
    return rows


def best_config(n: int, k: int, kernel_name: str) -> str | None:
    from edgelmm.methods.quantization import kernel

    tuned = {"triton": kernel._gemv_kernel, "splitk": kernel._splitk_kernel}.get(kernel_name)
    return None if tuned is None else next((str(c) for key, c in tuned.cache.items() if key[:2] == (n, k)), None)


def bench_kernel(device: torch.device) -> list[dict]:
    """Median microseconds (CUDA-graph replays, so launch overhead is out): bf16 F.linear (cuBLAS)
    vs each W4A16 kernel, batch 1, Qwen2.5-7B shapes (and a fused-QKV width)."""
    from triton.testing import do_bench_cudagraph

    rows = []
    for k, n in [(3584, 512), (3584, 3584), (3584, 4608), (3584, 18944), (18944, 3584), (3584, 152064)]:
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        bf16_us = do_bench_cudagraph(lambda x=x, w=linear.weight: F.linear(x, w), rep=100, return_mode="median") * 1e3
        row = {"K": k, "N": n, "bf16_us": bf16_us, "bf16_GBs": weight_bytes(linear) / bf16_us / 1e3}
        for name in KERNELS:
            try:
                layer, used = forced(linear, 4, False, name)
                layer(x)  # autotune outside the graph
                us = do_bench_cudagraph(lambda x=x, layer=layer: layer(x), rep=100, return_mode="median") * 1e3
                row[name] = {"used": used, "us": us, "GBs": weight_bytes(layer) / us / 1e3, "bytes": weight_bytes(layer),
                             "speedup": bf16_us / us, "config": best_config(n, k, used)}
                del layer
            except Exception as error:  # noqa: BLE001
                row[name] = {"error": repr(error)[:500]}
        rows.append(row)
        del linear
    return rows


def allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device)


def measure(model: torch.nn.Module, decoder: StaticDecoder, device: torch.device, steps: int, repeats: int, base: int,
            compile_mode: str | None) -> dict:
    """Weight bytes, allocated bytes and decode speed: the eager-module step and the compiled
    step, each in a CUDA graph (the numbers to report), and a short eager run (launch-bound)."""
    result = {"weight_bytes": weight_bytes(model), "allocated_bytes": None}
    caches = decoder.k.untyped_storage().nbytes() + decoder.v.untyped_storage().nbytes()
    if (total := allocated(device)) is not None:
        result["allocated_bytes"] = total - base - caches  # the model's own allocations
    cuda = device.type == "cuda"
    modes = [("graph", True, steps, repeats), ("eager", False, 16, 2)] if cuda else [("eager", False, steps, repeats)]
    if compile_mode:
        modes.append(("compiled", cuda, steps, repeats))
    for mode, graph, n, r in modes:
        try:
            if mode == "compiled":
                torch._dynamo.reset()
                decoder.fwd = torch.compile(decoder.forward, mode=None if compile_mode == "default" else compile_mode, fullgraph=False)
                started = time.perf_counter()
                decoder.reset(1)
                for _ in range(2):
                    decoder.step()
                if cuda:
                    torch.cuda.synchronize()
                result["compile_s"] = time.perf_counter() - started
            times = time_decode(decoder, n, r, graph)
            result[f"{mode}_s_per_token"] = statistics.median(times)
            result[f"{mode}_tok_s"] = 1 / statistics.median(times)
            result[f"{mode}_all_s_per_token"] = times
        except Exception as error:  # noqa: BLE001 - reported, the run goes on
            result[f"{mode}_error"] = repr(error)[:2000]
        finally:
            decoder.fwd = decoder.forward
    torch._dynamo.reset()
    return result


def summary(report: dict) -> list[str]:
    lines = [f"device: {report['device']}  torch {report['torch']}  triton {report.get('triton', '-')}  compile mode {report['compile_mode']}",
             "variant          weight GB  x bf16  alloc GB  graph tok/s  compiled tok/s  eager tok/s  (CUDA-graph medians)"]
    bf16 = report.get("bf16")
    for name in ("bf16", "w4a16", "w4a16_lm_head"):
        if name not in report:
            continue
        r = report[name]
        alloc = "-" if r["allocated_bytes"] is None else f"{r['allocated_bytes'] / 1e9:.2f}"
        lines.append(f"{name:15s} {r['weight_bytes'] / 1e9:9.2f}  {r['weight_bytes'] / bf16['weight_bytes']:6.3f}  {alloc:>8s}"
                     f"  {r.get('graph_tok_s', float('nan')):11.1f}  {r.get('compiled_tok_s', float('nan')):14.1f}"
                     f"  {r.get('eager_tok_s', float('nan')):11.1f}")
        if name != "bf16":
            for mode in ("graph", "compiled"):
                if f"{mode}_tok_s" in r and f"{mode}_tok_s" in bf16:
                    lines.append(f"    {mode}: x{r[f'{mode}_tok_s'] / bf16[f'{mode}_tok_s']:.2f} of bf16")
        errors = {k: v for k, v in r.items() if k.endswith("_error")}
        lines += [f"    {k}: {v[:300]}" for k, v in errors.items()]
        if "compile_s" in r:
            lines.append(f"    compile + 2 steps: {r['compile_s']:.0f} s")
        if "kernels" in r:
            lines.append(f"    layers per kernel: {r['kernels']}")
    if "kernel_check" in report:
        worst: dict[str, float] = {}
        for r in report["kernel_check"]:
            if "rel_err" in r:
                worst[r["kernel"]] = max(worst.get(r["kernel"], 0.0), r["rel_err"])
        bad = [r for r in report["kernel_check"]
               if "error" in r or not (r.get("finite") and r.get("repeat_equal") and r.get("state_dict_exact"))]
        lines.append(f"kernel max rel err vs dequant+matmul (fp64), per kernel: { {k: f'{v:.2e}' for k, v in worst.items()} }"
                     + (f"; {len(bad)} failed: {bad[:2]}" if bad else ""))
    for r in report.get("kernel_bench", []):
        parts = [f"  K={r['K']:5d} N={r['N']:6d}: bf16 {r['bf16_us']:6.1f} us ({r['bf16_GBs']:.0f} GB/s)"]
        for name in KERNELS:
            k = r.get(name, {})
            parts.append(f"{name} ERROR" if "error" in k else f"{name} {k['us']:6.1f} us ({k['GBs']:.0f} GB/s, x{k['speedup']:.2f})")
        lines.append("  ".join(parts))
    for key, choice in report.get("kernel_choices", {}).items():
        lines.append(f"  auto {key}: {choice['kernel']}  us {({k: round(v, 1) for k, v in choice['us'].items()})}")
    if "loop_vs_transformers_rel_err" in report:
        lines.append(f"loop vs transformers rel err: {report['loop_vs_transformers_rel_err']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (checking the loop)")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode of the compiled loop ('default', 'max-autotune-no-cudagraphs', ...; 'none': no compiled loop)")
    parser.add_argument("--skip-kernels", action="store_true", help="no per-kernel check and timing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    compile_mode = None if args.compile_mode == "none" else args.compile_mode
    torch.manual_seed(0)
    report: dict = {"torch": torch.__version__, "platform": platform.platform(), "compile_mode": args.compile_mode,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def save(stage: str) -> None:
        """Write what is there so far (a run cut short still leaves its numbers)."""
        report["stage"] = stage
        print(f"[{time.strftime('%H:%M:%S')}] {stage}", flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_decode.json").write_text(json.dumps(report, indent=2, default=str))
            (args.out / "gpu_decode.txt").write_text("\n".join(summary(report)) + "\n")

    if device.type == "cuda":
        import triton

        report["triton"] = triton.__version__
        if not args.skip_kernels:
            report["kernel_check"] = check_kernel(device, dtype)
            save("kernel check")
            report["kernel_bench"] = bench_kernel(device)
            save("kernel bench")
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
    report["bf16"] = measure(model, decoder, device, args.steps, args.repeats, base, compile_mode)
    save("bf16")
    reference_logits = decoder.forward(torch.tensor([1], device=device), torch.tensor([0], device=device)).float()
    started = time.perf_counter()
    quantize(model, adapter, RTNConfig(bits=4, group_size=128), progress=False)
    report["quantize_s"] = time.perf_counter() - started
    started = time.perf_counter()
    kernels = prepare(model)
    report["prepare_s"] = time.perf_counter() - started
    report["loop_vs_transformers_rel_err"]["w4a16"] = check_loop(model, decoder)
    w4_logits = decoder.forward(torch.tensor([1], device=device), torch.tensor([0], device=device)).float()
    report["w4a16_vs_bf16_logits_rel_err"] = float((w4_logits - reference_logits).norm() / reference_logits.norm())
    report["w4a16"] = measure(model, decoder, device, args.steps, args.repeats, base, compile_mode)
    report["w4a16"]["kernels"] = kernels
    report["kernel_choices"] = {str(k): v for k, v in kernel_choices().items()}
    save("w4a16")
    quantize(model, adapter, RTNConfig(bits=4, group_size=128, extra=("lm_head",)), progress=False)
    kernels = prepare(model)
    report["w4a16_lm_head"] = measure(model, decoder, device, args.steps, args.repeats, base, compile_mode)
    report["w4a16_lm_head"]["kernels"] = kernels
    report["kernel_choices"] = {str(k): v for k, v in kernel_choices().items()}
    save("done")
    print("\n".join(summary(report)))


if __name__ == "__main__":
    main()
