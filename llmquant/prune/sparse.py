"""Unstructured and N:M (semi-structured) pruning of the decoder blocks' linear layers.

Three methods, each a registered pruning method configured by :class:`SparsityConfig`:

* ``magnitude``: zero the weights of smallest |W|, per layer (unstructured) or per N:M group. No data.
* ``wanda`` (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| * ||X_j||_2`` (``X_j``: input feature j over the calibration tokens) and zero the lowest
  scores per output row (unstructured) or per N:M group. No weight update.
* ``sparsegpt`` (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): GPTQ's column-by-column solver with the inverse Hessian, where each column's
  pruned weights are set to zero and the error is spread over the columns not yet visited. The mask is
  chosen adaptively in blocks of ``block_size`` columns (unstructured: the ``sparsity`` fraction of the
  block with the least ``w^2 / [H^-1]_jj^2``, the OBS saliency) or per N:M group at its first column.
  With ``quantize`` the kept weights are also rounded to the GPTQ grid in the same pass (zeros stay
  exactly zero: the grid always holds 0), and the layers become QuantLinear.

Wanda and SparseGPT run block by block on calibration text with GPTQ's machinery
(:func:`llmquant.quantizers.gptq_model.quantize_gptq` with a per-layer solver): each block's
statistics are taken on the outputs of the blocks already pruned.

N:M runs along the input dimension K of every row (``2:4``: in each 4 consecutive inputs, 2 weights
kept), the layout sparse tensor cores and sparse CPU kernels use. The per-layer sparsity reached is
recorded in the summary and in the model config (``sparsity_config``) so that a sparse kernel can use it.
What it does not bring here: the CPU kernels of llmquant are dense, so zeros save neither time nor
memory until a sparse kernel exists; the checkpoint of a float pruned model is as large as before.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.config import LayerQuant, QuantConfig, match_pattern
from llmquant.modules.walk import find_linear_layers, linear_weight
from llmquant.prune.config import PruneMethod, SparsityConfig
from llmquant.quantizers.blocks import find_layer_stack
from llmquant.quantizers.gptq import GPTQ, inverse_hessian_cholesky
from llmquant.quantizers.gptq_model import gptq_solver, quantize_gptq
from llmquant.quantizers.grid import qparams, quantize_codes
from llmquant.quantizers.rtn import make_packed
from llmquant.registry import register_method

logger = logging.getLogger(__name__)


# --- masks ----------------------------------------------------------------------------------------
def _lowest(score: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """Boolean mask of the ``count`` lowest entries of ``score`` along ``dim`` (ties: lower index first)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        idx = torch.argsort(score, dim=dim, stable=True).narrow(dim, 0, count)
        mask.scatter_(dim, idx, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask [R, K] keeping the ``n`` highest scores in every ``m`` consecutive columns of a row.
    A ragged last group (K % m) keeps ``n`` too (all of it when it is narrower than n)."""
    r, k = score.shape
    full = k // m * m
    mask = torch.zeros_like(score, dtype=torch.bool)
    if full:
        mask[:, :full] = _lowest(score[:, :full].reshape(r, k // m, m), m - n, dim=2).reshape(r, full)
    if k > full and k - full > n:
        mask[:, full:] = _lowest(score[:, full:], k - full - n, dim=1)
    return mask


def score_mask(score: torch.Tensor, config: SparsityConfig, per_row: bool) -> torch.Tensor:
    """Prune mask from a score [R, K]: N:M groups, or the lowest ``sparsity`` fraction per row / whole."""
    if config.nm is not None:
        return nm_mask(score, *config.nm)
    r, k = score.shape
    if per_row:
        return _lowest(score, int(round(k * config.sparsity)), dim=1)
    return _lowest(score.reshape(1, -1), int(round(r * k * config.sparsity)), dim=1).reshape(r, k)


# --- layer selection ------------------------------------------------------------------------------
def selected_layers(model: nn.Module, config: SparsityConfig) -> tuple[str, list[tuple[str, nn.Module]]]:
    """(stack name, the decoder blocks' linear layers not skipped). Never the embedding or the head."""
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized: prune the float model (SparseGPT can "
                         "quantize in the same pass)")
    stack, layers = find_layer_stack(model)
    chosen = [(n, m) for n, m in find_linear_layers(layers, prefix=stack)
              if not any(match_pattern(p, n) for p in config.skip)]
    if not chosen:
        raise ValueError(f"{config.method}: no linear layer left to prune in {stack} (skip={list(config.skip)})")
    for n, m in chosen:
        if not torch.isfinite(linear_weight(m)).all():
            raise ValueError(f"{n}: weight has non-finite values (NaN or inf); refusing to prune")
    return stack, chosen


def _selection_config(config: SparsityConfig) -> QuantConfig:
    """The QuantConfig that drives the block-wise pass: the joint quantization's, or one that visits
    every linear layer of the decoder blocks (the head is skipped; the solver leaves ``skip`` dense)."""
    if config.quantize is not None:
        return config.quantize
    return QuantConfig(method="gptq", act_order=False, clip_search=False)


def _finish(model: nn.Module, config: SparsityConfig, per_layer: dict[str, float], sizes: dict[str, int],
            t0: float, extra: dict) -> dict:
    total = sum(sizes.values())
    record = {"method": config.method, "pattern": config.pattern, "target_sparsity": config.sparsity,
              "sparsity": sum(per_layer[n] * sizes[n] for n in per_layer) / total, "layers": per_layer}
    if hasattr(model, "config"):  # saved in config.json: where a sparse kernel will look
        model.config.sparsity_config = dict(record)
    logger.info("%s: %d layers pruned to %.1f%% zeros (%s) in %.1f s", config.method, len(per_layer),
                100 * record["sparsity"], config.pattern, time.perf_counter() - t0)
    return {**record, **extra, "seconds": round(time.perf_counter() - t0, 1)}


# --- magnitude ------------------------------------------------------------------------------------
@torch.no_grad()
def prune_magnitude(model: nn.Module, config: SparsityConfig, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    _, chosen = selected_layers(model, config)
    per_layer, sizes = {}, {}
    for name, mod in tqdm(chosen, desc="magnitude", unit="layer", disable=not progress):
        w = linear_weight(mod)
        mask = score_mask(w.detach().float().abs(), config, per_row=False)
        w.data.masked_fill_(mask, 0)  # a view of the stored weight: writes through
        per_layer[name], sizes[name] = float(mask.float().mean()), mask.numel()
    return _finish(model, config, per_layer, sizes, t0, {})


# --- Wanda and SparseGPT solvers ------------------------------------------------------------------
def _skipped(config: SparsityConfig, name: str) -> bool:
    return any(match_pattern(p, name) for p in config.skip)


def wanda_solver(config: SparsityConfig):
    def solve(name: str, g: GPTQ, scheme: LayerQuant):
        if _skipped(config, name):
            return linear_weight(g.layer).detach().float(), None, {"sparsity": 0.0, "rel_err": 0.0, "skipped": True}
        t0 = time.perf_counter()
        w = linear_weight(g.layer).detach().float().clone()
        norm = torch.diagonal(g.H).clamp_min(0).sqrt()  # proportional to ||X_j||
        mask = score_mask(w.abs() * norm, config, per_row=True)
        w[mask] = 0
        return w, None, {"sparsity": float(mask.float().mean()),
                         "rel_err": g._relative_error(linear_weight(g.layer).detach().float(), w),
                         "nsamples": g.nsamples, "seconds": time.perf_counter() - t0}

    return solve


def sparsegpt_solver(config: SparsityConfig):
    def solve(name: str, g: GPTQ, scheme: LayerQuant):
        q = config.quantize
        if _skipped(config, name):  # dense: quantized by plain GPTQ when quantizing, else left as it is
            if q is None:
                return linear_weight(g.layer).detach().float(), None, {"sparsity": 0.0, "rel_err": 0.0, "skipped": True}
            w, packed, st = gptq_solver(q)(name, g, scheme)
            return w, packed, {**st, "sparsity": 0.0, "skipped": True}
        w, packed, st = sparsegpt_layer(g, config, scheme if q is not None else None,
                                        clip_search=bool(q and q.clip_search))
        if q is not None:
            st = {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym, **st}
        return w, packed, st

    return solve


@torch.no_grad()
def sparsegpt_layer(g: GPTQ, config: SparsityConfig, scheme: LayerQuant | None, clip_search: bool = False):
    """SparseGPT on one layer from its accumulated Hessian; returns (weight [N, K] float32, PackedWeight
    or None, stats). ``scheme``: also quantize the kept weights (groups contiguous, no act-order)."""
    t0 = time.perf_counter()
    if g.nsamples == 0:
        raise ValueError(f"SparseGPT {g.name}: no calibration inputs reached this layer")
    w = linear_weight(g.layer).detach().float().clone()
    n_rows, k = w.shape
    h = g.H.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u, damp = inverse_hessian_cholesky(h, config.damp_percent, g.name)
    del h
    nm = config.nm
    G = k if scheme is None or scheme.group_size == -1 else scheme.group_size
    step = config.block_size
    if nm is not None:
        step = max(nm[1], step // nm[1] * nm[1])
    if scheme is not None and scheme.group_size != -1:
        step = max(G, step // G * G)
        if nm is not None and G % nm[1]:
            raise ValueError(f"SparseGPT {g.name}: group size {G} is not a multiple of M={nm[1]}")
    ng = (k + G - 1) // G
    scale = torch.empty(n_rows, ng) if scheme is not None else None
    zero = torch.empty(n_rows, ng) if scheme is not None else None
    importance = torch.diagonal(g.H).clone() if clip_search else None
    out = torch.zeros_like(w)
    mask = torch.zeros_like(w, dtype=torch.bool)
    loss = 0.0
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # adaptive mask of the whole block, chosen on the weights as updated so far
            m1 = score_mask(w1 ** 2 / d.unsqueeze(0) ** 2, config, per_row=False)
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                sl = slice(i, min(i + nm[1], i2 - i1))
                m1[:, sl] = nm_mask(w1[:, sl] ** 2 / d[sl].unsqueeze(0) ** 2, *nm)
            if scheme is not None and col % G == 0:
                grp = w1[:, i:i + G].masked_fill(m1[:, i:i + G], 0)
                imp = None if importance is None else importance[col:col + G]
                s, z = qparams(grp, scheme.bits, scheme.sym, imp is not None, imp)
                scale[:, col // G], zero[:, col // G] = s, z
            wc = w1[:, i]
            qc = wc.masked_fill(m1[:, i], 0)
            if scheme is not None:
                s, z = scale[:, col // G], zero[:, col // G]
                qc = (quantize_codes(qc, s, z, scheme.bits) - z) * s
            out[:, col] = qc
            e = (wc - qc) / d[i]
            loss += float((e * e).sum()) * float(d[i]) ** 2 / 2
            if i + 1 < i2 - i1:
                w1[:, i + 1:] -= e.unsqueeze(1) * u1[i, i + 1:].unsqueeze(0)
            err1[:, i] = e
        mask[:, i1:i2] = m1
        if i2 < k:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    packed = None
    if scheme is not None:
        codes = quantize_codes(out, scale.repeat_interleave(G, 1)[:, :k], zero.repeat_interleave(G, 1)[:, :k],
                               scheme.bits)
        packed = make_packed(codes, scale, zero, scheme)
    w_orig = linear_weight(g.layer).detach().float()
    st = {"sparsity": float(mask.float().mean()), "rel_err": g._relative_error(w_orig, out), "damp_percent": damp,
          "dead_columns": int(dead.sum()), "nsamples": g.nsamples, "seconds": time.perf_counter() - t0}
    return out, packed, st


def prune_sequential(model: nn.Module, config: SparsityConfig, calibration, progress: bool, solver) -> dict:
    """Wanda or SparseGPT (``solver``) block by block over the decoder stack."""
    t0 = time.perf_counter()
    _, chosen = selected_layers(model, config)
    sizes = {n: linear_weight(m).numel() for n, m in chosen}
    qconfig = _selection_config(config)
    summary = quantize_gptq(model, qconfig, calibration, progress=progress, solver=solver, desc=config.method)
    per_layer = {n: float(summary["modules"].get(n, {}).get("sparsity", 0.0)) for n in sizes}
    extra = {"modules": summary["modules"], "calibration": summary["calibration"]}
    if config.quantize is not None:
        extra["quantized_layers"] = len(summary["modules"])
        extra["kept_float"] = summary["kept_float"]
    return _finish(model, config, per_layer, sizes, t0, extra)


# --- registered methods ---------------------------------------------------------------------------
class _SparsityMethod(PruneMethod):
    config_type = SparsityConfig

    def check_model(self, model: nn.Module, config: SparsityConfig) -> None:
        selected_layers(model, config)


@register_method
class MagnitudeMethod(_SparsityMethod):
    name = "magnitude"
    description = "zero the smallest weights (unstructured or N:M); no data"

    def apply(self, model, config, calibration, progress):
        return model, prune_magnitude(model, config, progress)


@register_method
class WandaMethod(_SparsityMethod):
    name = "wanda"
    description = "zero the weights of least |W| * ||x||, per row or N:M group"
    needs_calibration = True

    def apply(self, model, config, calibration, progress):
        return model, prune_sequential(model, config, calibration, progress, wanda_solver(config))


@register_method
class SparseGPTMethod(_SparsityMethod):
    name = "sparsegpt"
    description = "one-shot OBS pruning with weight updates (optionally quantizing in the same pass)"
    needs_calibration = True

    def apply(self, model, config, calibration, progress):
        summary = prune_sequential(model, config, calibration, progress, sparsegpt_solver(config))
        if config.quantize is not None:  # the config the quantized layers now have (llmquant.prune.jobs stores it)
            summary["quantization_config"] = config.quantize.with_kept_float(summary["kept_float"]).to_dict()
        return model, summary
