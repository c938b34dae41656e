"""Structured pruning: a smaller *dense* model with fewer MLP channels, attention heads and layers.

Minitron-style (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): rank the model's units by how much they contribute on calibration text, remove the
least important ones, write a standard Hugging Face checkpoint with the reduced config, then recover
quality by distillation (:func:`llmquant.distill.distill`).

**Importance** (one forward pass over the calibration batches, float model). Every unit is scored by
the energy it adds to its sub-layer's output, relative to the energy of the hidden state leaving its
block, so that scores of different units and layers are comparable:

* MLP channel i of layer l: ``E[a_i^2] * ||W_down[:, i]||^2 / E||h_l||^2``, with ``a`` the input of
  ``down_proj`` -- exactly the energy of that channel's term in the MLP output;
* query head h: ``E||W_o[:, h] a_h||^2 / E||h_l||^2`` (``a_h``: the head's slice of the ``o_proj``
  input), the energy of its term in the attention output; a KV head scores the sum of its queries;
* layer l: ``E||h_l - x_l||^2 / E||h_l||^2``, the relative size of the block's update of the residual
  stream (removing a block removes that update; ShortGPT's block influence is the angular analogue).

Removing a set of units is predicted to cost the sum of their scores. Architectures with norms after
the sub-layers (Gemma 2/3) rescale the sub-layer output, so there the scores rank units within a layer
well but compare sub-layers only roughly.

**Shapes.** A transformers config has one ``intermediate_size`` and one head count for all layers,
so every kept layer keeps the same *number* of channels and heads (its own most important ones).
Grouped-query attention is respected: every KV group keeps the same number of query heads
(``heads`` axis), and a KV head is removed only with all of its queries (``kv_heads`` axis). The
counts are chosen by enumerating every combination the pruned axes allow and keeping the one with the
least predicted cost whose decoder-block parameters fit in ``keep`` times the original's; MLP widths
are multiples of ``round_to`` (default 64, so that group-wise quantization tiles them).

Supported: decoder blocks with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` linear
layers (Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3 text, SmolLM2); anything else is refused with the
reason (GPT-2's fused ``c_attn``, OPT's ``fc1``/``fc2`` MLP, mixture-of-experts MLPs, ...).
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.prune.config import PruneMethod, StructuredConfig
from llmquant.quantizers.blocks import find_layer_stack
from llmquant.registry import register_method

logger = logging.getLogger(__name__)

AXES = ("mlp", "heads", "kv_heads", "layers")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class StructuredPruneError(ValueError):
    """The model cannot be pruned as asked (unsupported layout, a size that removes everything, ...)."""


@dataclass(frozen=True)
class Shape:
    """The per-layer sizes of a decoder stack."""

    layers: int
    kv_heads: int
    heads_per_group: int  # query heads per KV head
    intermediate: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group


@dataclass(frozen=True)
class Arch:
    """What structured pruning needs to know about a model."""

    stack: str  # qualified name of the decoder ModuleList
    layers: nn.ModuleList
    hidden: int
    head_dim: int
    shape: Shape
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norm_params: int  # parameters per block outside the seven projections (norms)

    def block_params(self, s: Shape) -> int:
        """Decoder-block parameters of a stack of shape ``s``."""
        d, h = self.head_dim, self.hidden
        attn = h * d * (2 * s.heads + 2 * s.kv_heads)
        attn += d * (s.heads + 2 * s.kv_heads) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        mlp = 3 * h * s.intermediate + (2 * s.intermediate + h if self.mlp_bias else 0)
        return s.layers * (attn + mlp + self.norm_params)


def inspect_model(model: nn.Module) -> Arch:
    """The layout of ``model``; :class:`StructuredPruneError` naming the reason if it is not prunable."""
    arch_name = type(model).__name__
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise StructuredPruneError(f"{arch_name} is quantized: structured pruning works on float models "
                                   "(prune first, then quantize)")
    try:
        stack, layers = find_layer_stack(model)
    except ValueError as e:
        raise StructuredPruneError(str(e)) from None
    block = layers[0]
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    missing = [f"self_attn.{n}" for n in ATTN if not isinstance(getattr(attn, n, None), nn.Linear)]
    missing += [f"mlp.{n}" for n in MLP if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing:
        present = sorted(n for n, m in block.named_modules() if n and not list(m.children()))
        raise StructuredPruneError(
            f"{arch_name} ({getattr(getattr(model, 'config', None), 'model_type', '?')}): structured pruning supports decoder blocks with "
            f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj linear layers (Llama, Mistral, Qwen2, "
            f"Gemma3 text); this block lacks {missing} (it has {present[:12]})")
    cfg = getattr(model, "config", None)
    need = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
    if cfg is None or any(not isinstance(getattr(cfg, a, None), int) for a in need):
        raise StructuredPruneError(f"{arch_name}: structured pruning needs a transformers config with {need}")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    hid = cfg.hidden_size
    inter = cfg.intermediate_size
    expect = {"q_proj": (heads * d, hid), "k_proj": (kv * d, hid), "v_proj": (kv * d, hid), "o_proj": (hid, heads * d)}
    for i, b in enumerate(layers):
        for n, shp in expect.items():
            got = tuple(getattr(b.self_attn, n).weight.shape)
            if got != shp:
                raise StructuredPruneError(f"{arch_name}: layer {i} self_attn.{n} is {got}, the config says {shp} "
                                           "(per-layer sizes are not supported)")
        for n, shp in {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}.items():
            got = tuple(getattr(b.mlp, n).weight.shape)
            if got != shp:
                raise StructuredPruneError(f"{arch_name}: layer {i} mlp.{n} is {got}, the config says {shp}")
    if heads % kv:
        raise StructuredPruneError(f"{arch_name}: {heads} query heads do not split into {kv} KV groups")
    proj = {id(p) for n in ATTN for p in getattr(attn, n).parameters()}
    proj |= {id(p) for n in MLP for p in getattr(mlp, n).parameters()}
    norm_params = sum(p.numel() for p in block.parameters() if id(p) not in proj)
    return Arch(stack, layers, hid, d, Shape(len(layers), kv, heads // kv, inter),
                qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
                mlp_bias=mlp.down_proj.bias is not None,
                norm_params=norm_params)


# --- importance -----------------------------------------------------------------------------------
@dataclass
class Importance:
    """Predicted cost of removing each unit (see the module docstring); float64 tensors on the CPU."""

    mlp: list[torch.Tensor]  # per layer [I]
    heads: list[torch.Tensor]  # per layer [H]
    layers: torch.Tensor  # [L]
    tokens: int

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "layers": self.layers.tolist(),
                "heads": [h.tolist() for h in self.heads],
                "mlp_summary": [{"min": float(m.min()), "median": float(m.median()), "max": float(m.max())}
                                for m in self.mlp]}


@torch.no_grad()
def measure_importance(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = True) -> Importance:
    """Score every MLP channel, query head and layer of ``model`` on the token batches ``batches``."""
    arch = inspect_model(model)
    s, d = arch.shape, arch.head_dim
    n = s.layers
    act = [torch.zeros(s.intermediate, dtype=torch.float64) for _ in range(n)]
    head_e = [torch.zeros(s.heads, dtype=torch.float64) for _ in range(n)]
    upd = torch.zeros(n, dtype=torch.float64)
    out_e = torch.zeros(n, dtype=torch.float64)
    handles = []

    def down_hook(i):
        def pre(mod, args):
            a = args[0].detach().float().reshape(-1, s.intermediate)
            act[i] += (a * a).sum(0).double()
        return pre

    def o_hook(i):
        def pre(mod, args):
            a = args[0].detach().float().reshape(-1, s.heads, d)
            w = mod.weight.detach().float().view(arch.hidden, s.heads, d)
            for h in range(s.heads):  # one head at a time keeps the [T, hidden] term small
                y = a[:, h] @ w[:, h].t()
                head_e[i][h] += float((y * y).sum())
        return pre

    def block_hook(i):
        def post(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            upd[i] += float(((y.float() - x.float()) ** 2).sum())
            out_e[i] += float((y.float() ** 2).sum())
        return post

    for i, b in enumerate(arch.layers):
        handles.append(b.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
        handles.append(b.self_attn.o_proj.register_forward_pre_hook(o_hook(i)))
        handles.append(b.register_forward_hook(block_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for ids in tqdm(list(batches), desc="importance", unit="batch", disable=not progress):
            ids = torch.as_tensor(ids)
            ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise StructuredPruneError("structured pruning: the calibration data is empty")
    mlp = []
    for i, b in enumerate(arch.layers):
        col = (b.mlp.down_proj.weight.detach().double() ** 2).sum(0)
        norm = max(float(out_e[i]), 1e-30)
        mlp.append(act[i] * col / norm)
        head_e[i] /= norm
    layers = upd / out_e.clamp_min(1e-30)
    if not all(torch.isfinite(t).all() for t in (*mlp, *head_e, layers)):
        raise StructuredPruneError("structured pruning: non-finite activations on the calibration data")
    return Importance(mlp, head_e, layers, tokens)


# --- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Which units each kept layer keeps (indices into the original model, ascending)."""

    shape: Shape
    layers: list[int]
    kv_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept KV heads
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept query heads (grouped by KV head)
    channels: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept MLP channels
    predicted_cost: float = 0.0
    block_params: int = 0
    original_block_params: int = 0

    def summary(self) -> dict:
        return {"shape": asdict(self.shape), "layers": self.layers, "kv_heads": self.kv_heads, "heads": self.heads,
                "predicted_cost": self.predicted_cost, "block_params": self.block_params,
                "original_block_params": self.original_block_params,
                "kept_fraction": self.block_params / self.original_block_params}


def _kept_units(imp: Importance, arch: Arch, layer: int, s: Shape) -> tuple[list[int], list[int], list[int], float]:
    """(kept KV heads, kept query heads, kept channels, predicted cost of the removed ones) of one layer."""
    o = arch.shape
    h_imp = imp.heads[layer].view(o.kv_heads, o.heads_per_group)
    kv_keep = sorted(torch.argsort(h_imp.sum(1), descending=True, stable=True)[: s.kv_heads].tolist())
    heads = []
    for g in kv_keep:
        best = torch.argsort(h_imp[g], descending=True, stable=True)[: s.heads_per_group]
        heads.extend(g * o.heads_per_group + int(j) for j in sorted(best.tolist()))
    ch = sorted(torch.argsort(imp.mlp[layer], descending=True, stable=True)[: s.intermediate].tolist())
    cost = float(imp.heads[layer].sum() - imp.heads[layer][heads].sum())
    cost += float(imp.mlp[layer].sum() - imp.mlp[layer][ch].sum())
    return kv_keep, heads, ch, cost


def _options(full: int, fixed: int | None, pruned: bool, lo: int = 1) -> list[int]:
    if fixed is not None:
        return [fixed]
    return list(range(lo, full + 1)) if pruned else [full]


def make_plan(model: nn.Module, imp: Importance, keep: float | None, axes: Iterable[str] = ("mlp", "heads"), *,
              intermediate_size: int | None = None, heads_per_group: int | None = None,
              kv_heads: int | None = None, num_layers: int | None = None, round_to: int = 64) -> Plan:
    """Choose the pruned shape (see the module docstring) and which units each kept layer keeps.

    ``keep``: the fraction of decoder-block parameters kept (None: no budget, the given sizes decide).
    ``axes``: which of "mlp", "heads", "kv_heads", "layers" may shrink. The explicit sizes fix an axis.
    """
    arch = inspect_model(model)
    o = arch.shape
    axes = tuple(axes)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise StructuredPruneError(f"unknown axes {bad}; choose from {AXES}")
    if keep is not None and not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise StructuredPruneError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if round_to < 1:
        raise StructuredPruneError(f"round_to must be positive, got {round_to}")
    for name, v, full in (("intermediate_size", intermediate_size, o.intermediate),
                          ("heads_per_group", heads_per_group, o.heads_per_group),
                          ("kv_heads", kv_heads, o.kv_heads), ("num_layers", num_layers, o.layers)):
        if v is not None and not (isinstance(v, int) and 1 <= v <= full):
            what = {"heads_per_group": "every query head of a KV group", "kv_heads": "every KV head",
                    "num_layers": "every layer", "intermediate_size": "every MLP channel"}[name]
            raise StructuredPruneError(
                f"{name}={v!r}: must be between 1 and {full} (the model's); {v!r} would remove {what}"
                if isinstance(v, int) and v < 1 else f"{name}={v!r}: must be an int between 1 and {full} (the model's)")
    total = arch.block_params(o)
    budget = None if keep is None else keep * total
    layer_order = torch.argsort(imp.layers, stable=True).tolist()  # least important first
    inter_opts = ([intermediate_size] if intermediate_size is not None
                  else None if "mlp" in axes else [o.intermediate])
    best: tuple[float, int, Shape] | None = None
    smallest = None
    for nl, kv, g in itertools.product(_options(o.layers, num_layers, "layers" in axes),
                                       _options(o.kv_heads, kv_heads, "kv_heads" in axes),
                                       _options(o.heads_per_group, heads_per_group, "heads" in axes)):
        if inter_opts is not None:
            cands = inter_opts
        else:  # the widest MLP that fits the budget
            base = arch.block_params(Shape(nl, kv, g, 0))
            per_ch = arch.block_params(Shape(nl, kv, g, 1)) - base
            room = o.intermediate if budget is None else int((budget - base) // per_ch)
            width = min(o.intermediate, room // round_to * round_to if room < o.intermediate else o.intermediate)
            cands = [width] if width >= 1 else []
        for inter in cands:
            s = Shape(nl, kv, g, inter)
            params = arch.block_params(s)
            if smallest is None or params < smallest[0]:
                smallest = (params, s)
            if budget is not None and params > budget:
                continue
            removed = layer_order[: o.layers - nl]
            cost = float(imp.layers[removed].sum()) if removed else 0.0
            cost += sum(_kept_units(imp, arch, i, s)[3] for i in range(o.layers) if i not in removed)
            if best is None or (cost, -params) < (best[0], -best[1]):
                best = (cost, params, s)
    if best is None:
        lo = smallest[1] if smallest else None
        raise StructuredPruneError(
            f"keep={keep} cannot be reached by pruning {list(axes)}: the smallest such model keeps "
            f"{smallest[0] / total:.3f} of the decoder-block parameters ({lo}); allow more axes "
            "(mlp, heads, kv_heads, layers) or keep more" if smallest else
            f"keep={keep}: no MLP width (a multiple of round_to={round_to}) fits the budget")
    cost, params, s = best
    kept_layers = sorted(layer_order[o.layers - s.layers:])
    plan = Plan(s, kept_layers, predicted_cost=cost, block_params=params, original_block_params=total)
    for i in kept_layers:
        kv_keep, heads, ch, _ = _kept_units(imp, arch, i, s)
        plan.kv_heads[i], plan.heads[i], plan.channels[i] = kv_keep, heads, ch
    return plan


# --- building the smaller model -------------------------------------------------------------------
def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + j for u in units for j in range(size)], dtype=torch.long)


def _slice(rel: str, t: torch.Tensor, plan: Plan, layer: int, head_dim: int) -> torch.Tensor:
    q = _rows(plan.heads[layer], head_dim)
    kv = _rows(plan.kv_heads[layer], head_dim)
    ch = torch.tensor(plan.channels[layer], dtype=torch.long)
    table = {
        "self_attn.q_proj.weight": (0, q), "self_attn.q_proj.bias": (0, q),
        "self_attn.k_proj.weight": (0, kv), "self_attn.k_proj.bias": (0, kv),
        "self_attn.v_proj.weight": (0, kv), "self_attn.v_proj.bias": (0, kv),
        "self_attn.o_proj.weight": (1, q),
        "mlp.gate_proj.weight": (0, ch), "mlp.gate_proj.bias": (0, ch),
        "mlp.up_proj.weight": (0, ch), "mlp.up_proj.bias": (0, ch),
        "mlp.down_proj.weight": (1, ch),
    }
    if rel not in table:
        return t
    dim, idx = table[rel]
    return t.index_select(dim, idx).contiguous()


def pruned_config(config, plan: Plan, head_dim: int):
    cfg = copy.deepcopy(config)
    s = plan.shape
    cfg.num_hidden_layers = s.layers
    cfg.num_attention_heads = s.heads
    cfg.num_key_value_heads = s.kv_heads
    cfg.intermediate_size = s.intermediate
    cfg.head_dim = head_dim  # explicit: hidden_size // heads no longer gives it
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == config.num_hidden_layers:
        cfg.layer_types = [types[i] for i in plan.layers]
    return cfg


@torch.no_grad()
def build_pruned(model: nn.Module, plan: Plan) -> nn.Module:
    """A new model of the pruned shape holding the kept units' weights (``model`` is left unchanged)."""
    from transformers import AutoModelForCausalLM

    arch = inspect_model(model)
    cfg = pruned_config(model.config, plan, arch.head_dim)
    dtype = next(model.parameters()).dtype
    new_index = {old: new for new, old in enumerate(plan.layers)}
    prefix = arch.stack + "."
    sd = {}
    for k, t in model.state_dict().items():
        if k.startswith(prefix):
            idx, _, rel = k[len(prefix):].partition(".")
            i = int(idx)
            if i not in new_index:
                continue
            sd[f"{prefix}{new_index[i]}.{rel}"] = _slice(rel, t, plan, i, arch.head_dim)
        else:
            sd[k] = t
    new = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(cfg, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise StructuredPruneError(f"building the pruned {type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                                   f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        new.tie_weights()
    new.eval()
    return new


def prune_structured(model: nn.Module, calibration: Iterable[torch.Tensor], keep: float | None = 0.75,
                     axes: Iterable[str] = ("mlp", "heads"), progress: bool = True, **sizes) -> tuple[nn.Module, dict]:
    """Measure importance on ``calibration``, plan and build the pruned model; returns (model, summary).
    ``sizes``: the explicit sizes and ``round_to`` of :func:`make_plan`."""
    t0 = time.perf_counter()
    inspect_model(model)
    imp = measure_importance(model, calibration, progress)
    plan = make_plan(model, imp, keep, axes, **sizes)
    new = build_pruned(model, plan)
    s = plan.shape
    summary = {
        "method": "structured", "keep": keep, "axes": list(axes), **plan.summary(),
        "params": {"before": sum(p.numel() for p in model.parameters()), "after": sum(p.numel() for p in new.parameters())},
        "importance": imp.to_json(), "seconds": round(time.perf_counter() - t0, 1),
    }
    logger.info("structured pruning: %d layers, %d KV x %d query heads, MLP %d; %.1f%% of block parameters kept; "
                "predicted cost %.4f", s.layers, s.kv_heads, s.heads_per_group, s.intermediate,
                100 * summary["kept_fraction"], plan.predicted_cost)
    if math.isnan(plan.predicted_cost):
        raise StructuredPruneError("structured pruning: the predicted cost is NaN")
    return new, summary


@register_method
class StructuredMethod(PruneMethod):
    """Structured pruning into a smaller dense model (this module); configured by StructuredConfig."""

    name = "structured"
    description = "remove MLP channels, attention heads and layers: a smaller dense model"
    needs_calibration = True
    config_type = StructuredConfig

    def check_model(self, model: nn.Module, config: StructuredConfig) -> None:
        inspect_model(model)

    def apply(self, model: nn.Module, config: StructuredConfig, calibration, progress: bool):
        return prune_structured(model, calibration, config.keep, config.axes, progress, **config.sizes())
