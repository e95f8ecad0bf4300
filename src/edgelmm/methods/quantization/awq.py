"""AWQ: activation-aware scales and clipping, searched layer by layer on calibration activations.

As AutoAWQ: the calibration batches run through the decoder once, which gives the first layer's
input (and every layer's other arguments); then, for each layer, its float forward gives (a)
every linear's input activations and (b) the reference output, which is also the next layer's
input. For each group of linears that read the same
input, per-input-channel scales `s` are searched on a grid; the winner multiplies the group's
weights and is divided out of the op that produced the input (RMSNorm / LayerNorm weight, or
the rows of the preceding linear), so the float function is unchanged and only the rounding
sees the scaled weights. A grid point is judged on the output of the smallest block holding the
group (the attention for q, k, v; the MLP for gate, up: AutoAWQ's `module2inspect`), or of the
linears themselves when the fold goes into a linear, over `search_tokens` calibration tokens;
the activation statistics come from every token, and only the searched tokens' rows are kept,
so time and memory stay in proportion to the model rather than to the calibration set. Then
each linear's clipping range is searched on its own output error, one batched matmul per
candidate range.

Nothing here names a model class or an attribute such as `q_proj`. The structure is read off
one traced forward of the layer: linears that receive the very same tensor form a group, and
the module whose output that tensor is, is the op to fold into. A group whose input is made
by a function (the attention's output, `act(gate) * up`) gets as producer the earlier linear of
matching width for which the fold provably leaves the layer's output unchanged (v -> o when
their widths match, up -> down). Every fold is checked that way, with random scales, before
it is used, so a family whose norm is `x * (1 + w)` (Gemma) gets the right fold and an
unfamiliar layout gets none rather than a wrong one. Linears whose output reaches the layer
output only through attention scores (q, k) are not clipped, as AutoAWQ does not clip them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization.calibration import CalibrationBatch
from edgelmm.methods.quantization.config import AWQConfig
from edgelmm.methods.quantization.packing import fake_quantize
from edgelmm.models.base import ModelAdapter


@dataclass
class LayerInput:
    """One calibration batch at a decoder layer's input: hidden states, the other arguments the
    model passed to the layer (rotary embeddings, mask, positions), and the real-token mask."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: torch.Tensor  # [batch, seq] bool

    def run(self, layer: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        out = layer(self.hidden if hidden is None else hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class Fold:
    """Where 1/s goes: a norm's weight (`offset` 1 for `x * (1 + w)` norms) or a linear's rows."""

    module: nn.Module
    kind: str  # "norm" or "linear"
    offset: float = 0.0

    def apply(self, s: torch.Tensor) -> None:
        weight = self.module.weight
        if self.kind == "linear":
            weight.div_(s.view(-1, 1).to(weight.dtype))
        else:
            weight.copy_(((weight.float() + self.offset) / s - self.offset).to(weight.dtype))
        bias = getattr(self.module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))


@dataclass
class Group:
    """Linears reading one input; `fold` is None when no exact fold exists (then no scaling)."""

    linears: list[nn.Linear]
    fold: Fold | None = None
    functional_input: bool = False  # made by a function (attention output, act(gate) * up), no module


class _Stop(Exception):
    """Raised by the hook on the first decoder layer: everything after it is not needed."""


# ---------------------------------------------------------------- capturing layer inputs


def capture_layer_inputs(
    model: nn.Module, adapter: ModelAdapter, batches: list[CalibrationBatch]
) -> tuple[list[LayerInput], list[list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """Run each batch through the decoder and keep what the layers receive: the first layer's
    hidden states, and every layer's other arguments (which differ between layers in families
    that mix sliding-window and full attention). The forward stops at the last layer."""
    first = next(p for p in model.parameters() if p.is_floating_point())
    device, dtype = first.device, first.dtype
    layers = adapter.language_layers()
    samples: list[LayerInput] = []
    arguments: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in layers]

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            arguments[index].append((tuple(args[1:]), dict(kwargs)))
            if index == 0:
                samples.append(LayerInput(hidden.detach(), *arguments[0][-1], mask))
            if index == len(layers) - 1:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask = batch.attention_mask.to(device).bool()
            extra = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.extra.items()}
            try:
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False, **extra)
            except _Stop:
                continue
            raise EdgelmmError("the model's forward never reached its last decoder layer", "is the adapter right for this model?")
    finally:
        for handle in handles:
            handle.remove()
    return samples, arguments


# ---------------------------------------------------------------- structure of a layer


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


def _delta_error(layer: nn.Module, sample: LayerInput, reference: torch.Tensor) -> float:
    """Relative change of the layer's contribution (output - input): the residual would hide it."""
    delta = sample.run(layer).float() - sample.hidden.float()
    ref = reference.float() - sample.hidden.float()
    return float((delta - ref).norm() / ref.norm().clamp(min=1e-12))


def _snapshot(modules: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in modules]


def _restore(modules: list[nn.Module], saved: list[dict[str, torch.Tensor]]) -> None:
    for module, params in zip(modules, saved):
        for name, value in params.items():
            getattr(module, name).copy_(value)


def _fold_is_exact(layer: nn.Module, fold: Fold, linears: list[nn.Linear], sample: LayerInput, reference: torch.Tensor) -> bool:
    """Fold random scales in and check that the layer computes the same; always undone."""
    width = linears[0].in_features
    s = torch.exp(torch.empty(width, device=reference.device).uniform_(-1.4, 1.4))  # in [1/4, 4]
    touched = [fold.module, *linears]
    saved = _snapshot(touched)
    try:
        fold.apply(s)
        for linear in linears:
            linear.weight.mul_(s.to(linear.weight.dtype))
        return _delta_error(layer, sample, reference) < _tolerance(reference.dtype)
    finally:
        _restore(touched, saved)


Outputs = list[tuple[torch.Tensor, nn.Module]]


def _trace(layer: nn.Module, sample: LayerInput, linears: list[nn.Linear]) -> tuple[dict[nn.Linear, torch.Tensor], Outputs]:
    """Each linear's input tensor, and every submodule's output tensor in the order produced."""
    inputs: dict[nn.Linear, torch.Tensor] = {}
    outputs: Outputs = []  # the tensors stay referenced, so no address is reused during the trace
    handles = [lin.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0])) for lin in linears]
    for module in layer.modules():
        if module is not layer:
            handles.append(module.register_forward_hook(
                lambda m, a, out: outputs.append((out, m)) if isinstance(out, torch.Tensor) else None
            ))
    try:
        sample.run(layer)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _producer(tensor: torch.Tensor, outputs: Outputs) -> nn.Module | None:
    return next((m for out, m in outputs if _same(out, tensor)), None)


def _value_like(layer: nn.Module, sample: LayerInput, linear: nn.Linear, others: list[nn.Linear]) -> bool:
    """Does doubling this linear's output exactly double another linear's input? (v and up do;
    q, k and gate do not, their outputs pass through softmax or an activation first.)"""
    def inputs() -> dict[nn.Linear, torch.Tensor]:
        seen, _ = _trace(layer, sample, others)
        return {k: v.detach().clone() for k, v in seen.items()}

    base = inputs()
    saved = _snapshot([linear])
    try:
        linear.weight.mul_(2)
        if linear.bias is not None:
            linear.bias.mul_(2)
        doubled = inputs()
    finally:
        _restore([linear], saved)
    tol = _tolerance(linear.weight.dtype)
    return any(
        float((doubled[o].float() - 2 * base[o].float()).norm() / base[o].float().norm().clamp(min=1e-12)) < tol
        for o in others if o is not linear and o in base
    )


def layer_groups(layer: nn.Module, sample: LayerInput, reference: torch.Tensor, targets: set[nn.Linear]) -> list[Group]:
    """The layer's linears grouped by shared input, each with its verified fold (or none)."""
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear) and m in targets]
    inputs, outputs = _trace(layer, sample, linears)
    order = sorted((lin for lin in linears if lin in inputs), key=lambda lin: list(inputs).index(lin))
    groups: list[tuple[torch.Tensor, list[nn.Linear]]] = []
    for lin in order:
        for tensor, members in groups:
            if _same(tensor, inputs[lin]):
                members.append(lin)
                break
        else:
            groups.append((inputs[lin], [lin]))
    result = []
    for tensor, members in groups:
        producer = _producer(tensor, outputs)
        group = Group(members, functional_input=producer is None)
        candidates: list[Fold] = []
        if isinstance(producer, nn.Linear) and producer.out_features == members[0].in_features:
            candidates.append(Fold(producer, "linear"))
        elif producer is not None and getattr(producer, "weight", None) is not None and producer.weight.dim() == 1:
            candidates += [Fold(producer, "norm"), Fold(producer, "norm", offset=1.0)]
        elif producer is None:  # made by a function: an earlier linear of matching width may feed it linearly
            earlier = order[: order.index(members[0])]
            candidates += [Fold(p, "linear") for p in earlier if p.out_features == members[0].in_features]
        group.fold = next((f for f in candidates if _fold_is_exact(layer, f, members, sample, reference)), None)
        result.append(group)
    return result


# ---------------------------------------------------------------- the search


@dataclass
class Features:
    """What the search needs of one linear's input: the mean |x| per input channel over every
    calibration token, and the rows (real tokens) of the searched samples."""

    abs_mean: torch.Tensor  # [width], float32
    rows: torch.Tensor  # [tokens, width]

    def scaled(self, s: torch.Tensor) -> Features:
        return Features(self.abs_mean / s.float(), self.rows / s.to(self.rows.dtype))


def _collect_inputs(
    layer: nn.Module, samples: list[LayerInput], linears: list[nn.Linear], inspected: list[nn.Module],
    searched: list[int],
) -> tuple[dict[nn.Linear, Features], list[torch.Tensor], dict[nn.Module, _Calls]]:
    """Each linear's input features (linears that read one tensor share them), the layer's
    outputs per sample, and the calls of the `inspected` submodules on the `searched` samples.
    Only the searched samples' rows are kept, so memory does not grow with the calibration set."""
    sums: dict[nn.Linear, torch.Tensor] = {}
    counts: dict[nn.Linear, int] = {}
    rows: dict[nn.Linear, list[torch.Tensor]] = {lin: [] for lin in linears}
    current: list[Any] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x, mask, seen, keep = args[0], *current
        key = (x.data_ptr(), x.shape, x.stride())
        if key not in seen:
            real = (x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])).detach()
            seen[key] = (real, real.abs().float().sum(0))
        real, total = seen[key]
        sums[module] = sums[module] + total if module in sums else total
        counts[module] = counts.get(module, 0) + real.shape[0]
        if keep:
            rows[module].append(real)

    handles = [lin.register_forward_pre_hook(hook) for lin in linears]
    calls, call_handles = _record_calls([m for m in dict.fromkeys(inspected) if m is not layer])
    outs = []
    try:
        for j, sample in enumerate(samples):
            recording = j in searched
            current[:] = [sample.mask, {}, recording]
            for record in calls.values():
                record.active = recording
            outs.append(sample.run(layer).detach())
    finally:
        for handle in [*handles, *call_handles]:
            handle.remove()
    if layer in inspected:
        calls[layer] = _Calls(layer, [((samples[j].hidden, *samples[j].args), samples[j].kwargs) for j in searched],
                              [outs[j] for j in searched])
    joined: dict[tuple[int, ...], Features] = {}  # one copy per shared input
    features = {}
    for lin, parts in rows.items():
        if parts:
            key = tuple(id(t) for t in parts)
            if key not in joined:
                joined[key] = Features(sums[lin] / max(counts[lin], 1), torch.cat(parts))
            features[lin] = joined[key]
    return features, outs, calls


def _output_loss(outputs: list[torch.Tensor], references: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Mean squared error over the real tokens of every sample."""
    total, count = 0.0, 0
    for out, ref, mask in zip(outputs, references, masks):
        diff = (out[mask] - ref[mask]).float()
        total += float(diff.pow(2).sum())
        count += diff.numel()
    return total / max(count, 1)


def _outputs(linears: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([lin(x) for lin in linears], -1)


def _search_scale(
    group: Group, x_mean: torch.Tensor, loss_of: Callable[[], float], config: AWQConfig
) -> torch.Tensor | None:
    """The grid point with the lowest loss, or None when no scaling (s = 1) beats them all."""
    weights = [lin.weight.detach().clone() for lin in group.linears]
    dtype = weights[0].dtype

    def quantize_with(s: torch.Tensor | None) -> None:
        for lin, w in zip(group.linears, weights):
            if s is None:
                lin.weight.copy_(fake_quantize(w, config.bits, config.group_size, config.symmetric, dtype))
            else:
                sv = s.to(dtype)
                lin.weight.copy_(fake_quantize(w * sv, config.bits, config.group_size, config.symmetric, dtype) / sv)

    w = torch.cat(weights).float().abs().reshape(-1, config.group_size)
    w_mean = (w / (w.amax(1, keepdim=True) + 1e-6)).reshape(-1, x_mean.shape[0]).mean(0)
    try:
        quantize_with(None)
        best_loss, best = loss_of(), None
        for step in range(config.grid):
            ratio = step / config.grid
            s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4) if config.duo_scaling else x_mean.pow(ratio)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            quantize_with(s)
            loss = loss_of()
            if loss < best_loss:
                best_loss, best = loss, s
    finally:
        for lin, w0 in zip(group.linears, weights):
            lin.weight.copy_(w0)
    return best


def _search_clip(linear: nn.Linear, x: torch.Tensor, config: AWQConfig) -> None:
    """Clamp the weight per group to the shrunk range that minimises the output error.

    Per group of `g` input channels the output error is a [tokens, g] x [g, out] product, so
    each candidate range costs one batched matmul over the groups."""
    w = linear.weight.detach()
    out_features, width = w.shape
    g = config.group_size
    groups = width // g
    step = max(1, x.shape[0] // config.clip_tokens)
    xs = x[::step][: config.clip_tokens].float().reshape(-1, groups, g).transpose(0, 1)  # [groups, tokens, g]
    chunk = max(1, 2**24 // (xs.shape[1] * groups))  # bounds the [groups, tokens, chunk] products
    for start in range(0, out_features, chunk):
        wc = w[start : start + chunk].float().reshape(-1, groups, g)  # [rows, groups, g]
        rows = wc.shape[0]
        reference = torch.bmm(xs, wc.permute(1, 2, 0))  # [groups, tokens, rows]
        top = wc.abs().amax(-1, keepdim=True)  # [rows, groups, 1]
        best_top, best_err = top.clone(), torch.full((rows, groups), float("inf"), device=w.device)
        for i in range(int(config.max_shrink * config.clip_grid)):
            limit = top * (1 - i / config.clip_grid)
            clipped = torch.maximum(torch.minimum(wc, limit), -limit).reshape(rows, width)
            q = fake_quantize(clipped.to(w.dtype), config.bits, g, config.symmetric, w.dtype).float()
            err = (torch.bmm(xs, q.reshape(rows, groups, g).permute(1, 2, 0)) - reference).pow(2).mean(1).t()  # [rows, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_top = torch.where(better.unsqueeze(-1), limit, best_top)
        clamped = torch.maximum(torch.minimum(wc, best_top), -best_top).reshape(rows, width)
        w[start : start + chunk] = clamped.to(w.dtype)


def inspected_module(layer: nn.Module, linears: list[nn.Linear]) -> nn.Module:
    """The smallest submodule holding every linear of a group (the attention block for q, k, v;
    the MLP for gate, up): its output is what the group's scales are judged on, as AutoAWQ's
    `module2inspect`, instead of the whole layer's."""
    names = {m: n for n, m in layer.named_modules()}
    paths = [names[lin].split(".") for lin in linears]
    common: list[str] = []
    for parts in zip(*(p[:-1] for p in paths)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return layer.get_submodule(".".join(common)) if common else layer


@dataclass
class _Calls:
    """A module's calls over (some of) the calibration samples: its arguments and float outputs."""

    module: nn.Module
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    outputs: list[torch.Tensor]
    active: bool = True  # the hook records only while set

    def run(self) -> list[torch.Tensor]:
        outs = [self.module(*args, **kwargs) for args, kwargs in self.calls]
        return [o[0] if isinstance(o, tuple) else o for o in outs]


def _search_subset(masks: list[torch.Tensor], tokens: int) -> list[int]:
    """Samples spread evenly over the calibration set holding about `tokens` real tokens."""
    counts = [int(m.sum()) for m in masks]
    mean = max(1, sum(counts) // max(len(counts), 1))
    n = min(len(masks), max(1, -(-tokens // mean)))
    return sorted({round(i * (len(masks) - 1) / max(n - 1, 1)) for i in range(n)})


def _record_calls(modules: list[nn.Module]) -> tuple[dict[nn.Module, _Calls], list[Any]]:
    """Forward hooks that keep each module's arguments and output, call after call."""
    recorded = {m: _Calls(m, [], []) for m in modules}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        record = recorded[module]
        if not record.active:
            return
        record.calls.append((args, dict(kwargs)))
        record.outputs.append((out[0] if isinstance(out, tuple) else out).detach())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    return recorded, handles


@torch.no_grad()
def awq_search(
    model: nn.Module,
    adapter: ModelAdapter,
    config: AWQConfig,
    batches: list[CalibrationBatch],
    targets: set[nn.Linear],
    progress: bool = True,
) -> dict[str, int]:
    """Scale and clip the float weights of `targets` in place, layer by layer.

    Returns counts for the log: groups scaled, groups without an exact fold, linears clipped.
    Quantization itself (rounding and packing) is left to the caller.
    """
    if not batches:
        raise EdgelmmError("the calibration set is empty", "AWQ needs calibration text")
    samples, arguments = capture_layer_inputs(model, adapter, batches)
    masks = [s.mask for s in samples]
    searched = _search_subset(masks, config.search_tokens)
    stats = {"scaled": 0, "unfoldable": 0, "clipped": 0}
    layers = adapter.language_layers()
    bar = tqdm(layers, desc=f"awq w{config.bits} g{config.group_size}", unit="layer", disable=not progress, file=sys.stderr)
    for i, layer in enumerate(bar):
        bar.set_postfix_str(f"layer {i}: reading inputs")
        for sample, (args, kwargs) in zip(samples, arguments[i]):
            sample.args, sample.kwargs = args, kwargs
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear) and m in targets]
        groups = layer_groups(layer, samples[0], samples[0].run(layer).detach(), targets)
        inspected = {id(g): inspected_module(layer, g.linears) for g in groups if g.fold is not None and g.fold.kind == "norm"}
        feats, references, calls = _collect_inputs(layer, samples, linears, list(inspected.values()), searched)
        for n, group in enumerate(groups):
            bar.set_postfix_str(f"layer {i}: scales {n + 1}/{len(groups)}")
            if group.fold is None:
                stats["unfoldable"] += 1
                continue
            x = feats[group.linears[0]]
            if group.fold.kind == "norm":  # the enclosing block's output, its other linears in float
                block = calls[inspected[id(group)]]

                def loss_of() -> float:  # called at once, within this iteration
                    return _output_loss(block.run(), block.outputs, [masks[j] for j in searched])  # noqa: B023
            else:  # the consumer's own output, as AutoAWQ inspects o_proj and down_proj
                rows = x.rows[:: max(1, x.rows.shape[0] // config.search_tokens)][: config.search_tokens]
                reference = _outputs(group.linears, rows)

                def loss_of() -> float:  # called at once, within this iteration
                    return float((_outputs(group.linears, rows) - reference).float().pow(2).mean())  # noqa: B023
            s = _search_scale(group, x.abs_mean, loss_of, config)
            if s is None:
                continue
            group.fold.apply(s)
            for lin in group.linears:
                lin.weight.mul_(s.to(lin.weight.dtype))
                feats[lin] = feats[lin].scaled(s)
            stats["scaled"] += 1
        if config.clip:
            bar.set_postfix_str(f"layer {i}: clipping")
            attention = set(adapter.attention(i).modules())
            for group in groups:
                for lin in group.linears:
                    # score-side linears (q, k): softmax squashes their error; AutoAWQ leaves them
                    if lin in attention and not group.functional_input and not _value_like(layer, samples[0], lin, linears):
                        continue
                    _search_clip(lin, feats[lin].rows, config)
                    stats["clipped"] += 1
        for sample, out in zip(samples, references):
            sample.hidden = out
        bar.set_postfix(stats)
    return stats
