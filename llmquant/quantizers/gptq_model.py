"""Sequential GPTQ over a whole transformers model.

Works on any causal LM whose decoder blocks sit in one ``nn.ModuleList`` (Llama, Mistral, Qwen2,
Gemma3, GPT-2, OPT, ...), without a per-architecture copy of the loop (the block machinery is in
:mod:`llmquant.quantizers.blocks`):

1. **Capture** the hidden states entering the first block and the arguments the model gives each
   block (:func:`~llmquant.quantizers.blocks.capture`).
2. **Per block**, in order: forward pre-hooks accumulate the Hessians of the block's linear layers
   (layers that read the very same tensor, like q/k/v, share one), GPTQ quantizes them, and the block
   is run once more, now quantized, to produce the inputs of the next block; then its layers are
   replaced by :class:`~llmquant.modules.quant_linear.QuantLinear`. With ``true_sequential`` this is
   done stage by stage (q/k/v, then o, then gate/up, then down), so that each stage's Hessian sees
   the outputs of the stages already quantized.
3. **Output layer** (``quantize_lm_head``): the final norm is applied to the last block's outputs and
   the head is quantized like any other layer.

With ``float_targets`` a float copy of each block runs beside it on the float model's hidden states,
and every layer's GPTQ gets both inputs of the same tokens, so that it aims at the float model's
outputs (:mod:`llmquant.quantizers.gptq`); the output layer too, from the float final hidden states.

What keeps it fast: a Hessian pass stops the block's forward as soon as the last input it needs has
been seen; the layers already quantized are float stand-ins holding the dequantized weight
(:class:`_FakeQuantLinear`), so codes are not unpacked on every call; and a sub-module that can no
longer change (the attention once q/k/v/o are quantized) is replayed from its recorded outputs in the
later passes over the block instead of being recomputed. Only one block's activations (inputs and
outputs of all calibration sequences; with float targets its float copy's too) and Hessians are alive
at a time.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmquant.config import LayerQuant, QuantConfig
from llmquant.quantizers.blocks import (
    BlockRunner,
    Probe,
    StopForward,
    UnsupportedModelError,
    capture,
    find_layer_stack,
    make_chunks,
    probe_block,
    sequential_stages,
    settled_children,
)
from llmquant.modules.walk import find_linear_layers, is_linear, linear_weight, set_submodule
from llmquant.quantizers.gptq import GPTQ
from llmquant.quantizers.plan import (
    check_plan, dense_weight_check, head_shares_embedding, rotation_signs, share_table_from_head, to_quant_linear,
    untie_if_quantizing_head,
)
from llmquant.registry import Method, register_method

__all__ = ["FINAL_NORM_NAMES", "GPTQMethod", "UnsupportedModelError", "quantize_gptq"]

logger = logging.getLogger(__name__)

#: names of the final norm on the module that holds the layer stack
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm", "norm_f")
#: optional projection after the final norm (OPT-350m style)
FINAL_PROJ_NAMES = ("project_out",)

#: alpha of GPTQ's float targets (``QuantConfig.float_targets``, :mod:`llmquant.quantizers.gptq`): the
#: best of 0.125, 0.25, 0.5 and 1 on gemma3-270m rotated INT3 (WikiText-2; numbers in that module)
FLOAT_TARGET_WEIGHT = 0.25


def float_target_weight(config: QuantConfig) -> float:
    """The ``float_target`` alpha GPTQ takes under ``config`` (0: plain GPTQ)."""
    return FLOAT_TARGET_WEIGHT if config.float_targets else 0.0


#: default calibration tokens per forward chunk (whole sequences are kept together)
CHUNK_TOKENS = 4096


def _final_modules(model: nn.Module, stack_name: str) -> tuple[nn.Module | None, nn.Module | None]:
    """The final norm (and optional projection) applied between the stack and the output layer."""
    parent_name = stack_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    found = [n for n in FINAL_NORM_NAMES if hasattr(parent, n)]
    if not found:
        raise UnsupportedModelError(
            f"GPTQ quantize_lm_head: no final norm found on {parent_name or 'the model'} "
            f"({type(parent).__name__}); looked for attributes {FINAL_NORM_NAMES}"
        )
    # an attribute that is None (OPT-350m has no final norm) means identity
    norm = getattr(parent, found[0])
    proj = next((getattr(parent, n) for n in FINAL_PROJ_NAMES if getattr(parent, n, None) is not None), None)
    return norm, proj


def _final_hidden(x: torch.Tensor, norm: nn.Module | None, proj: nn.Module | None) -> torch.Tensor:
    """What the output layer reads from the last block's output ``x``: the final norm, then the projection."""
    h = x if norm is None else norm(x)
    return h if proj is None else proj(h)


def _output_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if head is None or not is_linear(head):
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name, head
    return None


# --- one block ------------------------------------------------------------------------------------
STAGES = ("capture", "hessian", "gptq", "forward", "lm_head")


@dataclass
class _Timer:
    """Wall seconds per stage: capture (embedding pass), hessian (block passes with Hessian hooks),
    gptq (the solver and packing), forward (quantized block outputs), lm_head."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.seconds[stage] += t - t0
        return t


def _hessian_pass(
    runner: BlockRunner,
    members: list[str],
    linears: dict[str, nn.Module],
    probe: Probe,
    prefix: str,
    inputs: list[torch.Tensor],
    floats: _FloatBlock | None = None,
) -> dict[str, GPTQ]:
    """Accumulate the Hessians of ``members``; layers that read the same tensor share one Hessian.
    ``floats``: the block in float and its inputs in the float model; each layer then also gets what
    the float model gives it on the same tokens (GPTQ's float targets)."""
    gptq = {rel: GPTQ(linears[rel], name=f"{prefix}.{rel}") for rel in members}
    owner: dict[int, str] = {}
    for rel in sorted(members, key=probe.order.__getitem__):
        owner.setdefault(probe.source[rel], rel)
    need = set(owner.values())
    seen: set[str] = set()
    float_in: dict[str, torch.Tensor] = {}

    def hook(rel, take):
        def pre(mod, args):
            take(rel, args[0])
            seen.add(rel)
            if seen == need:
                raise StopForward  # the rest of the block's forward is not needed

        return pre

    def add(rel, x):  # float_in holds the float copy's input of the same tokens (empty without floats)
        gptq[rel].add_batch(x, float_inp=float_in.get(rel))

    handles = [linears[rel].register_forward_pre_hook(hook(rel, add)) for rel in need]
    if floats is not None:
        handles += [floats.linears[rel].register_forward_pre_hook(hook(rel, float_in.__setitem__)) for rel in need]
    try:
        for j, x in enumerate(inputs):
            if floats is not None:
                seen.clear()
                float_in.clear()
                floats.runner.run_until_stopped(floats.inputs[j], j)
            seen.clear()
            runner.run_until_stopped(x, j)
    finally:
        for h in handles:
            h.remove()
    for rel in members:
        src = owner[probe.source[rel]]
        if src != rel:
            gptq[rel].adopt_hessian(gptq[src])
    return gptq


@dataclass
class _FloatBlock:
    """A float copy of the block being quantized, run on the float model's hidden states (GPTQ's float
    targets): ``runner`` runs the copy, ``linears`` are its linear layers, ``inputs`` what enters it."""

    runner: BlockRunner
    linears: dict[str, nn.Module]
    inputs: list[torch.Tensor]


class _FakeQuantLinear(nn.Module):
    """Stand-in for a layer GPTQ has just quantized, while the rest of its block is calibrated.

    It holds the dequantized weight (input column order) in the activation dtype and computes
    ``F.linear(x, Q, bias)``, without unpacking the codes on every call. For float32 activations that is
    what the reference kernel computes; for bf16/fp16 activations it is a low-precision matmul, like the
    fused kernels. At the end of the block it is replaced by the real QuantLinear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight.to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


#: a per-layer solver run in GPTQ's place by another method on the same block-wise machinery (SparseGPT,
#: Wanda): ``solver(name, gptq, scheme) -> (new weight float32 [N, K], PackedWeight or None, stats)``;
#: with None the layer stays a float layer holding the new weight
LayerSolver = Callable[[str, GPTQ, LayerQuant], tuple[torch.Tensor, Any, dict]]


def gptq_solver(config: QuantConfig) -> LayerSolver:
    """GPTQ as a :data:`LayerSolver` with ``config``'s settings (the driver's default)."""
    def solve(name: str, g: GPTQ, scheme: LayerQuant):
        packed, st = g.quantize(scheme, block_size=config.block_size, damp_percent=config.damp_percent,
                                act_order=config.act_order, static_groups=config.static_groups,
                                clip_search=config.clip_search, rot_signs=rotation_signs(config, name, g.columns),
                                float_target=float_target_weight(config), compact=config.compact_qparams)
        st = {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym, **st}
        return g.quantized_weight, packed, st

    return solve


def _quantize_block(
    runner: BlockRunner,
    prefix: str,
    config: QuantConfig,
    inputs: list[torch.Tensor],
    probes: dict,
    timer: _Timer,
    solver: LayerSolver,
    floats: _FloatBlock | None = None,
) -> tuple[dict[str, dict], dict]:
    """Solve (GPTQ) every planned linear layer of one block, stage by stage. The solved layers are left
    in the block as float stand-ins; returns (stats, {rel: (float module, PackedWeight or None, weight)})."""
    layer = runner.layer
    linears = dict(find_linear_layers(layer))
    schemes: dict[str, LayerQuant] = {}
    for rel in linears:
        s = config.resolve(f"{prefix}.{rel}")
        if s is not None:
            schemes[rel] = s
    if not schemes:
        return {}, {}
    key = (type(layer), tuple(sorted(linears)))
    if key not in probes:
        t0 = time.perf_counter()
        probes[key] = probe_block(runner, linears, inputs[0])
        timer.add("hessian", t0)
    probe = probes[key]
    stats: dict[str, dict] = {}
    done: dict[str, tuple[nn.Module, Any]] = {}
    pending = set(schemes)
    for stage in sequential_stages(linears, probe, config.true_sequential):
        members = [rel for rel in stage if rel in schemes]
        if not members:
            continue
        t0 = time.perf_counter()
        gptq = _hessian_pass(runner, members, linears, probe, prefix, inputs, floats)
        t0 = timer.add("hessian", t0)
        for rel in members:
            weight, packed, st = solver(f"{prefix}.{rel}", gptq[rel], schemes[rel])
            mod = linears[rel]
            stand_in = _FakeQuantLinear(weight, getattr(mod, "bias", None), inputs[0].dtype)
            set_submodule(layer, rel, stand_in)
            done[rel] = (mod, packed, weight if packed is None else None)
            pending.discard(rel)
            stats[f"{prefix}.{rel}"] = st
            del gptq[rel]
        if pending:  # more passes over this block follow: replay what can no longer change
            for name in settled_children(layer, linears, probe, pending):
                runner.freeze(name)
                if floats is not None:
                    floats.runner.freeze(name)
        timer.add("gptq", t0)
    return stats, done


# --- the driver -----------------------------------------------------------------------------------
@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor],
    progress: bool = True,
    *,
    chunk_tokens: int = CHUNK_TOKENS,
    solver: LayerSolver | None = None,
    desc: str = "GPTQ",
) -> dict:
    """Quantize ``model`` in place with GPTQ, block by block; returns a summary dict.

    ``calibration``: token id tensors [1, T] or [B, T] (see :func:`llmquant.calibration.calibration_batches`).
    ``chunk_tokens``: calibration tokens per forward call (whole sequences; at least one sequence).

    The summary holds ``layers`` (number of quantized linear layers), ``seconds``, ``stages`` (seconds
    per stage: capture, hessian, gptq, forward, lm_head), ``modules`` (per linear layer: the relative
    output error ``||WX - QX||^2 / ||WX||^2`` on the calibration inputs, dampening, seconds, scheme),
    ``blocks`` (per decoder block: seconds, mean and max relative error) and ``kept_float`` (layers the
    config asked for that the driver does not reach, like OPT-350m's ``project_in``/``project_out``:
    they stay in float, a warning is logged, and :func:`llmquant.quantizers.quantize_model` records
    them as skipped in the config the checkpoint gets).

    ``solver``: run this per layer instead of GPTQ (:data:`LayerSolver`; SparseGPT and Wanda use the
    same block-wise machinery); ``desc`` names the progress bar and the summary's method.

    Runs under ``torch.no_grad`` rather than ``inference_mode``: the new QuantLinear buffers must stay
    ordinary tensors so that the model can later load state dicts in place.
    """
    t_start = time.perf_counter()
    timer = _Timer()
    stack_name, layers, head, unreached = _layout(model, config)  # fails before anything changes
    head_scheme = config.resolve(head[0]) if head is not None else None
    # a tied head that shares the quantized embedding table: GPTQ quantizes the table as the head (its
    # Hessian: the final hidden states), without a stored perm (act-order groups fixed up front, so the
    # lookups read columns in order), then the embedding reads the same codes
    shares_table = head is not None and head_shares_embedding(model, config)
    if head_scheme is not None:
        norm, proj = _final_modules(model, stack_name)
    untie_if_quantizing_head(model, config)
    if head is not None:  # untying may have replaced the head's weight, not the module
        head = (head[0], model.get_submodule(head[0]))
    if unreached:
        logger.warning("GPTQ: %d linear layers outside the decoder stack are kept in float: %s", len(unreached), unreached)

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        chunks = make_chunks(calibration, chunk_tokens, device)
        cap = capture(model, layers, chunks)
        timer.add("capture", t0)
        n_seq = sum(c.ids.shape[0] for c in chunks)
        n_tok = sum(c.ids.numel() for c in chunks)
        logger.info(
            "GPTQ: %d calibration sequences (%d tokens) in %d chunks; %d blocks in %s",
            n_seq, n_tok, len(chunks), len(layers), stack_name,
        )

        inputs = cap.inputs
        float_inputs = list(inputs) if config.float_targets else None  # the float model's hidden states
        modules: dict[str, dict] = {}
        blocks: list[dict] = []
        probes: dict = {}
        bar = tqdm(range(len(layers)), desc=desc, unit="block", disable=not progress)
        for i in bar:
            t_block = time.perf_counter()
            layer = layers[i]
            runner = BlockRunner(layer, cap.calls_of(i), chunks)
            floats = None
            if float_inputs is not None:
                twin = copy.deepcopy(layer)
                floats = _FloatBlock(BlockRunner(twin, cap.calls_of(i), chunks), dict(find_linear_layers(twin)),
                                     float_inputs)
            try:
                stats, done = _quantize_block(runner, f"{stack_name}.{i}", config, inputs, probes, timer,
                                              solver or gptq_solver(config), floats)
                t0 = time.perf_counter()
                inputs = [runner.run(x, j) for j, x in enumerate(inputs)]
                if floats is not None:
                    float_inputs = [floats.runner.run(x, j) for j, x in enumerate(float_inputs)]
            finally:
                runner.close()
                if floats is not None:
                    floats.runner.close()
            del floats
            for rel, (mod, packed, weight) in done.items():
                if packed is None:  # a float layer with its new weight (pruned)
                    _set_weight(mod, weight)
                    set_submodule(layer, rel, mod)
                else:
                    set_submodule(layer, rel, to_quant_linear(mod, packed, config, f"{stack_name}.{i}.{rel}"))
            del done
            timer.add("forward", t0)
            modules.update(stats)
            errs = [s["rel_err"] for s in stats.values()]
            blocks.append({
                "index": i,
                "seconds": time.perf_counter() - t_block,
                "mean_rel_err": sum(errs) / len(errs) if errs else None,
                "max_rel_err": max(errs) if errs else None,
            })
            if errs:
                bar.set_postfix(max_rel_err=f"{max(errs):.2e}")
        bar.close()
        del cap

        if head is not None and head_scheme is not None:
            t0 = time.perf_counter()
            name, mod = head
            g = GPTQ(mod, name=name)
            for j, x in enumerate(inputs):
                g.add_batch(_final_hidden(x, norm, proj),
                            float_inp=None if float_inputs is None else _final_hidden(float_inputs[j], norm, proj))
            del inputs, float_inputs
            packed, st = g.quantize(
                head_scheme,
                block_size=config.block_size,
                damp_percent=config.damp_percent,
                act_order=config.act_order,
                static_groups=config.static_groups or (shares_table and config.act_order),
                clip_search=config.clip_search,
                float_target=float_target_weight(config),
                compact=config.compact_qparams and not shares_table,  # a shared table keeps float16 scales
            )
            del g
            if shares_table:
                share_table_from_head(model, packed, head_scheme, config)
            else:
                set_submodule(model, name, to_quant_linear(mod, packed, config, name))
            s = head_scheme
            modules[name] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, **st}
            timer.add("lm_head", t0)
    finally:
        model.train(was_training)

    summary = {
        "method": desc.lower(),
        "layers": len(modules),
        "seconds": time.perf_counter() - t_start,
        "stages": dict(timer.seconds),
        "calibration": {"sequences": n_seq, "tokens": n_tok},
        "modules": modules,
        "blocks": blocks,
        "kept_float": unreached,
    }
    _log_summary(summary)
    return summary


def _set_weight(mod: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` (float32 [N, K]) into a float linear layer, in its dtype and layout."""
    linear_weight(mod).data.copy_(weight)  # a [N, K] view of the stored weight (GPT-2's Conv1D: [K, N])


def _layout(model: nn.Module, config: QuantConfig) -> tuple[str, nn.ModuleList, tuple | None, list[str]]:
    """(stack name, decoder blocks, output layer or None, layers the config selects that GPTQ does not
    reach). Raises before anything changes if GPTQ cannot run on ``model`` with ``config``."""
    stack_name, layers = find_layer_stack(model)
    todo = check_plan(model, config)
    for name, mod, _ in todo:
        dense_weight_check(name, mod)
    head = _output_layer(model)
    if head is not None and config.resolve(head[0]) is not None:
        _final_modules(model, stack_name)
    reached = {f"{stack_name}." + n for n, _ in find_linear_layers(layers)}
    if head is not None:
        reached.add(head[0])
    return stack_name, layers, head, [name for name, _, _ in todo if name not in reached]


@register_method
class GPTQMethod(Method):
    """Sequential GPTQ over the decoder blocks of a transformers causal LM (see the module docstring)."""

    name = "gptq"
    description = "GPTQ, block by block on calibration text"
    needs_calibration = True
    supports_mixed = True
    supports_rotation = True
    options = frozenset({"act_order", "static_groups", "clip_search", "float_targets", "compact_qparams"})
    #: the best settings measured on gemma3-270m (evals/results): act-order and clip search each
    #: lower INT4 and INT3 perplexity
    defaults = {"act_order": True, "clip_search": True}

    def check_model(self, model: nn.Module, config: QuantConfig) -> None:
        _layout(model, config)

    def apply(self, model: nn.Module, config: QuantConfig, calibration, progress: bool) -> dict:
        return quantize_gptq(model, config, calibration, progress=progress)


def _log_summary(summary: dict) -> None:
    logger.info("GPTQ summary: %d layers in %.1f s (%s)", summary["layers"], summary["seconds"],
                ", ".join(f"{k} {v:.1f} s" for k, v in summary["stages"].items()))
    for b in summary["blocks"]:
        if b["mean_rel_err"] is not None:
            logger.info("  block %3d: %6.1f s  rel. output error mean %.3e max %.3e",
                        b["index"], b["seconds"], b["mean_rel_err"], b["max_rel_err"])
    for name, m in summary["modules"].items():
        logger.debug("  %s: rel_err %.3e damp %s %s s", name, m.get("rel_err"), m.get("damp_percent"), m.get("seconds"))
