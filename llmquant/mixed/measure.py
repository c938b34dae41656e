"""The measurement pass of mixed precision: for every layer a config quantizes and every candidate
scheme, the predicted damage and the exact stored bytes.

One pass over the float model, block by block, on a slice of the calibration data:

1. **Hessians.** Forward pre-hooks accumulate ``H = 2/M X^T X`` for every planned linear layer of the
   block (layers that read the very same tensor, like q/k/v, share one), then the block's float output
   becomes the next block's input. The output layer's Hessian comes from the final norm's output.
2. **Output error per scheme.** For a scheme s the layer's output error on the calibration inputs is
   ``e(s) = tr(D H D^T)`` with D the weight error (GPTQ's objective). It is computed on a fixed random
   subset of rows (rows are independent given H) and scaled to all rows: round-to-nearest with the
   method's clipping search for every candidate, and GPTQ itself (the config's act-order and clip
   settings) at 3 and 4 bits, group 128 and (when per-channel schemes are candidates) per channel;
   GPTQ's error for every scheme is the round-to-nearest error times the GPTQ/RTN ratio of the nearest
   of those bit widths (:func:`reference_bits`) on its own kind of grid (per channel, or grouped).
   Measurement version 2; version 1 used the group-128 ratios for per-channel schemes too.
   For ``method="rtn"`` the round-to-nearest error is the prediction.
3. **Calibration against the real effect.** Output error in different layers costs the model very
   different amounts. For every *fused group* (the layers that read one input tensor: q/k/v, gate/up,
   or a single layer) the group alone is quantized with a probe scheme (round-to-nearest, 4 bits)
   and the KL divergence of the model's next-token distribution from the float model's is measured on
   held-out calibration positions; ``sensitivity = KL / e(probe)`` turns the group's output error
   into predicted KL. The damage of giving a group scheme s is ``sensitivity * sum of e(s)`` over its
   layers: additive over groups, which is what the allocator (:mod:`llmquant.mixed.allocate`) needs.

4. **The embedding table** (``quantize_embedding``, bit and size budgets): one more group, quantized by
   round-to-nearest. Its output error is that of its lookups on the calibration tokens plus, when the
   output layer shares the table, the head's ``tr(D H D^T)``; its probe quantizes the whole table
   (block 0's input changes by the lookups' error, and a shared head multiplies with the probe table).
   Its bytes count once.

The result is a :class:`Measurement`, written as JSON (:meth:`Measurement.save`) so that a second
budget reuses it; :meth:`Measurement.check` refuses a file made for another model, another candidate
set or other method settings, naming the numbers that differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmquant.config import LayerQuant, QuantConfig
from llmquant.fsutil import atomic_write_text
from llmquant.mixed.cost import layer_bytes, parse_scheme_key, scheme_key
from llmquant.modules.quant_embedding import embed_scale_of
from llmquant.modules.walk import _is_conv1d, find_linear_layers, linear_weight
from llmquant.quantizers.blocks import BlockRunner, capture, find_layer_stack, make_chunks, probe_block
from llmquant.formats.rotation import rotate, rotate_hessian, unpack_signs, unrotate
from llmquant.quantizers.gptq import GPTQ
from llmquant.quantizers.gptq_model import _final_hidden, _final_modules, _output_layer
from llmquant.quantizers.plan import (
    check_plan, dense_weight_check, embedding_scheme, head_shares_embedding, input_embedding, rotation_signs,
)
from llmquant.quantizers.grid import CLIP_STEP, _range_qparams, clip_search, fake_quantize

logger = logging.getLogger(__name__)

MEASUREMENT_VERSION = 2
#: rows of each layer the per-scheme errors are computed on (all rows when the layer has fewer)
ROWS = 128
#: the clipping search of the per-scheme estimates tries every ESTIMATE_CLIP_STEP (the quantizers:
#: every CLIP_STEP); the GPTQ/RTN ratio of each bit width is taken with the same coarse search
ESTIMATE_CLIP_STEP = 0.05
#: the probe scheme whose real effect (KL) calibrates each group's output error
PROBE = LayerQuant(4, 128, True)


class MeasurementError(ValueError):
    """A measurement file does not fit the model or the config it is used with."""


@dataclass
class LayerMeasure:
    name: str
    n: int
    k: int
    #: scheme key -> predicted absolute output error tr(D H D^T) of the method at that scheme
    errors: dict[str, float]
    #: scheme key -> stored bytes
    bytes: dict[str, int]
    #: tr(W H W^T): the output energy, so errors can be read as relative
    energy: float


@dataclass
class GroupMeasure:
    """Layers that share an input tensor; they get one scheme together (vLLM fuses them)."""

    name: str
    layers: list[str]
    #: predicted KL per unit of summed output error
    sensitivity: float
    probe_kl: float
    probe_error: float


@dataclass
class Measurement:
    version: int
    fingerprint: str
    model: dict[str, Any]
    settings: dict[str, Any]
    candidates: list[str]
    layers: list[LayerMeasure]
    groups: list[GroupMeasure]
    #: checkpoint bytes outside the planned layers (embeddings, norms, float layers) in storage dtype
    other_bytes: int
    calibration: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    # --- reading the numbers ------------------------------------------------------------------
    def layer(self, name: str) -> LayerMeasure:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def damage(self, group: GroupMeasure, key: str) -> float:
        """Predicted KL (nats per token) of quantizing ``group`` with scheme ``key``."""
        return group.sensitivity * sum(self.layer(n).errors[key] for n in group.layers)

    # --- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurement":
        if d.get("version") != MEASUREMENT_VERSION:
            raise MeasurementError(f"measurement version {d.get('version')!r}; this llmquant reads {MEASUREMENT_VERSION}")
        d = dict(d)
        d["layers"] = [LayerMeasure(**x) for x in d["layers"]]
        d["groups"] = [GroupMeasure(**x) for x in d["groups"]]
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Measurement":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MeasurementError(f"cannot read the measurement file {path}: {e}") from None
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError) as e:
            raise MeasurementError(f"{path} is not a llmquant measurement file ({e})") from None

    def reprice(self, model: nn.Module, config: QuantConfig) -> int:
        """Price every layer's schemes at the bytes this llmquant stores for ``config`` (the predicted errors
        do not depend on them, the bytes do on the format: a file written before the compact int16 perm
        prices an int32 one); returns how many layers' prices changed."""
        table = table_target(model, config)
        schemes = {key: parse_scheme_key(key) for key in self.candidates}
        changed = 0
        for lay in self.layers:
            now = stored_bytes(config, lay.name, lay.n, lay.k, schemes, table is not None and lay.name == table[0])
            if now != lay.bytes:
                lay.bytes = now
                changed += 1
        return changed

    def check(self, model: nn.Module, config: QuantConfig, keys: Iterable[str]) -> None:
        """Raise :class:`MeasurementError` unless this measurement was made for ``model`` (same planned
        layers, shapes and weights), the settings of ``config`` and covers the scheme ``keys``."""
        fp, desc = model_fingerprint(model, config)
        if fp != self.fingerprint:
            mine = {lay.name: (lay.n, lay.k) for lay in self.layers}
            theirs = desc["layers"]
            diff = next((f"{n}: {mine.get(n)} in the file, {s} here" for n, s in theirs.items() if mine.get(n) != tuple(s)), None)
            if diff is None:
                diff = next((f"{n} is in the file only" for n in mine if n not in theirs), "the weights differ")
            raise MeasurementError(
                f"the measurement was made for another model: {len(self.layers)} layers, fingerprint "
                f"{self.fingerprint[:12]} ({self.model.get('name_or_path')}); this model has "
                f"{len(desc['layers'])} planned layers, fingerprint {fp[:12]} ({desc['name_or_path']}); first difference: {diff}"
            )
        mine_settings = method_settings(config)
        if mine_settings != self.settings:
            raise MeasurementError(f"the measurement was made with {self.settings}; this config has {mine_settings}")
        missing = sorted(set(keys) - set(self.candidates))
        if missing:
            raise MeasurementError(
                f"the measurement covers the schemes {self.candidates}; the config also asks for {missing}"
            )


def stored_bytes(config: QuantConfig, name: str, n: int, k: int, schemes: dict[str, LayerQuant],
                 table: bool = False) -> dict[str, int]:
    """The bytes layer ``name`` [n, k] stores under ``config`` at each of ``schemes`` (by key); an embedding
    table (``table``) is stored once, never with an act-order perm or rotated."""
    if table:
        return {key: layer_bytes(n, k, s, False) for key, s in schemes.items()}
    return {key: layer_bytes(n, k, s, config.stores_perm, config.rotates(name, k), config.compact_qparams)
            for key, s in schemes.items()}


def method_settings(config: QuantConfig) -> dict[str, Any]:
    """The config fields the predicted errors depend on."""
    settings = {"method": config.method, "act_order": config.act_order, "static_groups": config.static_groups,
                "clip_search": config.clip_search, "damp_percent": config.damp_percent}
    if config.quantize_embedding:  # the embedding table is measured and priced too, with a sharing head or not
        settings["quantize_embedding"] = True
        settings["quantize_lm_head"] = config.quantize_lm_head
    if config.rotation is not None:  # a measurement of unrotated layers does not price rotated ones
        settings["rotation"] = config.rotation
    if config.compact_qparams:  # nor does one of float16 scales price compact ones
        settings["compact_qparams"] = True
    return settings


def model_fingerprint(model: nn.Module, config: QuantConfig) -> tuple[str, dict[str, Any]]:
    """A hash of the planned layers' names, shapes and a sample of their weights."""
    h = hashlib.sha256()
    layers = {}
    table = table_target(model, config)
    entries = [(name, linear_weight(mod)) for name, mod, _ in check_plan(model, config)]
    if table is not None:
        entries.append((table[0], table[1].weight))
    for name, w in entries:
        w = w.detach()
        layers[name] = list(w.shape)
        h.update(name.encode())
        h.update(repr(tuple(w.shape)).encode())
        sample = w.flatten()[:: max(1, w.numel() // 64)][:64].to(torch.float32)
        h.update(repr([round(float(v), 6) for v in sample]).encode())
    return h.hexdigest(), {"name_or_path": getattr(model, "name_or_path", None), "layers": layers}


# --- the pass -------------------------------------------------------------------------------------
def other_bytes(model: nn.Module, config: QuantConfig, planned: set[str], dtype: torch.dtype) -> int:
    """Bytes the checkpoint will spend outside the allocated layers: :func:`_other_bytes` and the files'
    header (:func:`header_bytes`), less the float
    input embedding when ``config.quantize_embedding`` (the allocation prices the table, :func:`table_target`;
    under a latency budget it keeps its fixed scheme and is counted at that size here) and plus, if that
    unties a float head from it, the head's own float copy."""
    total = _other_bytes(model, planned, dtype) + header_bytes(model, config, planned)
    scheme = embedding_scheme(model, config)
    if scheme is None:
        return total
    _, emb = input_embedding(model)  # type: ignore[misc]
    v, d = emb.weight.shape
    total -= v * d * torch.empty((), dtype=dtype).element_size()
    if config.max_latency is not None:
        total += layer_bytes(v, d, scheme, False)
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if "lm_head" not in planned and not head_shares_embedding(model, config) and w is emb.weight:
        total += w.numel() * torch.empty((), dtype=dtype).element_size()  # untied: the head keeps a float copy
    return total


#: safetensors header bytes allowed per stored tensor (its JSON entry: name, dtype, shape, offsets; about
#: 110 bytes in the built-in models' files) and per file (metadata), so that a size budget holds for the files
HEADER_BYTES_PER_TENSOR = 160
HEADER_BYTES_PER_FILE = 1024


def header_bytes(model: nn.Module, config: QuantConfig, planned: set[str]) -> int:
    """An upper bound on the safetensors header of the checkpoint: every float tensor outside the planned
    layers, and up to four tensors (qweight, scales, zeros, perm) per planned layer and for the table."""
    skip = {f"{n}.weight" for n in planned}
    n = sum(1 for k in model.state_dict() if k not in skip) + 4 * (len(planned) + config.quantize_embedding)
    return HEADER_BYTES_PER_FILE + HEADER_BYTES_PER_TENSOR * n


def _other_bytes(model: nn.Module, planned: set[str], dtype: torch.dtype) -> int:
    """Bytes the checkpoint spends outside the planned layers' packed tensors (shared storage once)."""
    skip = {f"{n}.weight" for n in planned}
    seen = set()
    total = 0
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        size = torch.empty((), dtype=dtype).element_size() if v.is_floating_point() else v.element_size()
        total += v.numel() * size
    return total


def table_target(model: nn.Module, config: QuantConfig) -> tuple[str, nn.Module, bool] | None:
    """The input embedding the allocation prices (``quantize_embedding``, any budget but latency): its name,
    module, and whether the output layer shares the table."""
    if config.max_latency is not None or embedding_scheme(model, config) is None:
        return None
    name, emb = input_embedding(model)  # type: ignore[misc]
    if not isinstance(emb, nn.Embedding):
        raise MeasurementError(f"{name}: quantize_embedding supports nn.Embedding tables, not {type(emb).__name__}")
    return name, emb, head_shares_embedding(model, config)


def _table_measure(table: torch.Tensor, counts: torch.Tensor, scale: float, head_h: torch.Tensor | None,
                   head_nsamples: int, schemes: list[LayerQuant], config: QuantConfig, seed: int = 0):
    """The embedding table's predicted output error per scheme: its lookups' error
    ``2/N sum_t |dE_t|^2 scale^2`` over the N calibration tokens (a layer's ``tr(D H D^T)`` with GPTQ's
    ``H = 2/N sum x x^T``; round to nearest), plus, when the output layer shares the table, the head's
    ``tr(D H D^T)`` as :func:`layer_errors` predicts it for the method (GPTQ quantizes a shared table as
    the head). Also its energy, the probe table (round to nearest, like every probe) and its error."""
    w = table.detach().to(torch.float32)
    counts = counts.to(w.device)
    used = counts.nonzero().flatten()
    # per token, as GPTQ's H = 2/N sum x x^T weighs a layer's error: 2/N sum_t |dE_t|^2 scale^2
    wu, cu = w[used], counts[used].to(torch.float32) * (2.0 * scale * scale / float(counts.sum()))
    idx = _row_subset(w.shape[0], ROWS, seed)
    wh = w if idx is None else w[idx]
    rows_scale = w.shape[0] / wh.shape[0]

    def err(q_used: torch.Tensor, q_head: torch.Tensor | None) -> float:
        """q_used: the quantized rows ``used``; q_head: the quantized rows ``idx`` (the head's sample)."""
        e = float((((wu - q_used) ** 2).sum(1) * cu).sum())
        if q_head is not None:
            e += _output_error(wh - q_head, head_h) * rows_scale
        return e

    head_errors = {} if head_h is None else layer_errors("lm_head", w, head_h, head_nsamples, schemes, config, seed)
    errors = {}
    for s in schemes:
        key = scheme_key(s)
        errors[key] = err(_rtn_weight(wu, s, config.clip_search, None, ESTIMATE_CLIP_STEP), None) + head_errors.get(key, 0.0)
    energy = float(((wu ** 2).sum(1) * cu).sum()) + (0.0 if head_h is None else _output_error(w, head_h))
    probe = torch.cat([_rtn_weight(w[i:i + 16384], PROBE, config.clip_search, None) for i in range(0, w.shape[0], 16384)])
    probe_error = err(probe[used], None if head_h is None else (probe if idx is None else probe[idx]))
    return errors, energy, probe, probe_error


def _row_subset(n: int, rows: int, seed: int) -> torch.Tensor | None:
    if n <= rows:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:rows].sort().values


def _output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    return float(((d @ h) * d).sum())


def _rtn_weight(
    w: torch.Tensor, scheme: LayerQuant, clip: bool, importance: torch.Tensor | None, step: float = CLIP_STEP,
    compact: bool = False,
) -> torch.Tensor:
    """Round-to-nearest of ``w`` [R, K] as the quantizers do it (the grid and clipping search of
    :func:`llmquant.quantizers.rtn.group_qparams`), every group searched at once; ``step``: of the
    clipping factors (the quantizers' by default); ``compact``: scales on the compact grid."""
    r, k = w.shape
    g = k if scheme.group_size == -1 else scheme.group_size
    ng = -(-k // g)
    padded = torch.zeros(r, ng * g, dtype=torch.float32, device=w.device)
    padded[:, :k] = w
    wg = padded.view(r, ng, g)
    xmin = wg.amin(dim=2).clamp(max=0)
    xmax = wg.amax(dim=2).clamp(min=0)
    if clip:
        imp = torch.ones(ng * g, dtype=torch.float32, device=w.device)
        if importance is not None:
            imp[:k] = importance.float()
        imp[k:] = 0
        imp = imp.view(1, ng, g)

        def err(s, z):
            d = fake_quantize(wg, s.unsqueeze(2), z.unsqueeze(2), scheme.bits).sub_(wg)
            return (d * d * imp).sum(2)

        scale, zero = clip_search(xmin, xmax, scheme.bits, scheme.sym, err, step, compact)
    else:
        scale, zero = _range_qparams(xmin, xmax, scheme.bits, scheme.sym, compact)
    return fake_quantize(wg, scale.unsqueeze(2), zero.unsqueeze(2), scheme.bits).reshape(r, ng * g)[:, :k]


def _gptq_weight(w: torch.Tensor, h: torch.Tensor, nsamples: int, scheme: LayerQuant, config: QuantConfig, name: str) -> torch.Tensor:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    g = GPTQ(lin, name=name)
    g.H = h
    g.nsamples = nsamples
    g.quantize(scheme, block_size=config.block_size, damp_percent=config.damp_percent, act_order=config.act_order,
               static_groups=config.static_groups, clip_search=config.clip_search, compact=config.compact_qparams)
    return g.quantized_weight


def _reference_group(schemes: list[LayerQuant]) -> int:
    sizes = {s.group_size for s in schemes}
    return 128 if 128 in sizes else sorted(sizes, key=lambda g: (g == -1, g))[0]


def layer_errors(
    name: str, w: torch.Tensor, h: torch.Tensor, nsamples: int, schemes: list[LayerQuant], config: QuantConfig, seed: int = 0
) -> dict[str, float]:
    """Predicted output error ``tr(D H D^T)`` of ``config.method`` for every scheme (module docstring)."""
    w = w.detach().to(torch.float32)
    n = w.shape[0]
    idx = _row_subset(n, ROWS, seed)
    ws = w if idx is None else w[idx]
    scale_rows = n / ws.shape[0]
    gptq = config.method == "gptq"
    importance = torch.diagonal(h).clone() if gptq else None
    rtn = {scheme_key(s): _output_error(ws - _rtn_weight(ws, s, config.clip_search, importance, ESTIMATE_CLIP_STEP,
                                                             config.compact_qparams), h)
           * scale_rows for s in schemes}
    if not gptq:
        return rtn
    # GPTQ/RTN ratios at the reference group size, and per channel where that is a candidate: GPTQ's gain
    # differs most between grouped and per-channel grids (on gemma3-270m one ratio for both mispredicted
    # per-channel errors by 0.16x-1.7x; grouped sizes among themselves mostly by 0.85x-1.2x)
    grids = [_reference_group(schemes)] + ([-1] if any(s.group_size == -1 for s in schemes) else [])
    grids = list(dict.fromkeys(grids))
    all_bits = sorted({s.bits for s in schemes})
    ratio: dict[tuple[int, bool], float] = {}
    for g in grids:
        for bits in reference_bits(all_bits):
            ref = LayerQuant(bits, g, True)
            q = _gptq_weight(ws.clone(), h, nsamples, ref, config, name)
            e_gptq = _output_error(ws - q, h) * scale_rows
            e_rtn = rtn.get(scheme_key(ref))
            if e_rtn is None:
                e_rtn = _output_error(ws - _rtn_weight(ws, ref, config.clip_search, importance, ESTIMATE_CLIP_STEP,
                                                     config.compact_qparams),
                                      h) * scale_rows
            ratio[(bits, g == -1)] = e_gptq / e_rtn if e_rtn > 0 else 1.0

    def ratio_of(s: LayerQuant) -> float:
        # the grid's own ratios if measured (per channel, or grouped), else the grouped ones; of those the
        # nearest measured bit width's (ties: the lower one)
        per_channel = s.group_size == -1 and any(pc for _, pc in ratio)
        measured = {b: r for (b, pc), r in ratio.items() if pc == per_channel}
        return measured[min(measured, key=lambda b: (abs(b - s.bits), b))]

    return {scheme_key(s): rtn[scheme_key(s)] * ratio_of(s) for s in schemes}


def reference_bits(bits: list[int]) -> list[int]:
    """The bit widths GPTQ itself is run at: 3 and 4 where they are candidates (the widths most layers
    get; GPTQ's gain at 2 bits is then taken as at 3, at 8 bits as at 4), else every candidate width."""
    mid = [b for b in bits if b in (3, 4)]
    return mid or list(bits)


def _set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    w = w.to(mod.weight.dtype)
    mod.weight.data = w.t().contiguous() if _is_conv1d(mod) else w


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(ref || q) in nats."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(-1).mean())


@torch.no_grad()
def measure(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[torch.Tensor],
    schemes: list[LayerQuant],
    progress: bool = True,
    *,
    measure_sequences: int = 16,
    probe_sequences: int = 1,
    probe_positions: int = 128,
    seed: int = 0,
) -> Measurement:
    """Run the measurement pass (module docstring) on a float transformers causal LM.

    ``measure_sequences``: calibration sequences the Hessians are accumulated on; ``probe_sequences``
    and ``probe_positions``: the held-out sequences and the number of their positions (drawn at
    random, fixed by ``seed``) the KL of each probe is measured on.
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    todo = check_plan(model, config)
    for name, mod, _ in todo:
        dense_weight_check(name, mod)
    planned = {name for name, _, _ in todo}
    stack_name, layers = find_layer_stack(model)
    head = _output_layer(model)
    head_planned = head is not None and head[0] in planned
    reached = {f"{stack_name}." + n for n, _ in find_linear_layers(layers)} | ({head[0]} if head_planned else set())
    unreached = sorted(planned - reached)
    if unreached:
        raise MeasurementError(f"mixed precision: layers outside the decoder stack cannot be measured: {unreached}")
    norm, proj = _final_modules(model, stack_name)
    if head is None:
        raise MeasurementError("mixed precision: the model has no output layer to measure the KL of its logits")

    seqs = []
    for t in calibration:
        t = torch.as_tensor(t)
        seqs.extend(t.unsqueeze(0) if t.dim() == 1 else t)
    if len(seqs) < probe_sequences + 1:
        raise ValueError(f"mixed precision needs at least {probe_sequences + 1} calibration sequences, got {len(seqs)}")
    probe_seqs = seqs[:probe_sequences]
    hess_seqs = seqs[probe_sequences:probe_sequences + measure_sequences]
    device = next(model.parameters()).device
    chunks = make_chunks([s.unsqueeze(0) for s in hess_seqs], 4096, device)
    probe_chunks = make_chunks([torch.stack(probe_seqs)], 1 << 30, device)
    if len(probe_chunks) != 1:
        raise ValueError("mixed precision: the probe sequences must all have the same length")
    chunks = chunks + probe_chunks
    jp = len(chunks) - 1  # the probe chunk

    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        cap = capture(model, layers, chunks)
        inputs = cap.inputs
        seconds["capture"] = time.perf_counter() - t0

        errors: dict[str, dict[str, float]] = {}
        energy: dict[str, float] = {}
        probe_weight: dict[str, torch.Tensor] = {}
        probe_error: dict[str, float] = {}
        group_of: dict[str, str] = {}
        probe_inputs: list[torch.Tensor] = []
        runners: list[BlockRunner] = []
        probes: dict = {}
        t_hess = t_err = 0.0
        bar = tqdm(range(len(layers)), desc="mixed: measure", unit="block", disable=not progress)
        for i in bar:
            prefix = f"{stack_name}.{i}"
            runner = BlockRunner(layers[i], cap.calls_of(i), chunks)
            runners.append(runner)
            probe_inputs.append(inputs[jp])
            linears = {rel: m for rel, m in find_linear_layers(layers[i]) if f"{prefix}.{rel}" in planned}
            t0 = time.perf_counter()
            hess: dict[str, GPTQ] = {}
            owner: dict[str, str] = {}
            if linears:
                all_linears = dict(find_linear_layers(layers[i]))
                key = (type(layers[i]), tuple(sorted(all_linears)))
                if key not in probes:  # blocks of one type call their layers the same way
                    probes[key] = probe_block(runner, all_linears, inputs[0])
                probe = probes[key]
                first: dict[int, str] = {}
                for rel in sorted(linears, key=probe.order.__getitem__):
                    owner[rel] = first.setdefault(probe.source[rel], rel)
                for rel in set(owner.values()):
                    hess[rel] = GPTQ(linears[rel], name=f"{prefix}.{rel}")
                handles = [linears[rel].register_forward_pre_hook(
                    lambda m, a, g=hess[rel]: g.add_batch(a[0])) for rel in hess]
            else:
                handles = []
            try:
                nxt = []
                for j, x in enumerate(inputs):
                    if j == jp:
                        for hd in handles:
                            hd.remove()
                        handles = []
                    nxt.append(runner.run(x, j))
            finally:
                for hd in handles:
                    hd.remove()
            inputs = nxt
            t_hess += time.perf_counter() - t0
            t0 = time.perf_counter()
            for rel, mod in linears.items():
                full = f"{prefix}.{rel}"
                g = hess[owner[rel]]
                group_of[full] = f"{prefix}.{owner[rel]}"
                _measure_layer(full, mod, g, schemes, config, errors, energy, probe_weight, probe_error)
            t_err += time.perf_counter() - t0
        bar.close()
        seconds["hessian"] = t_hess

        final_probe = inputs[jp]
        if head_planned:
            t0 = time.perf_counter()
            g = _head_hessian(head, inputs[:jp], norm, proj)
            group_of[head[0]] = head[0]
            _measure_layer(head[0], head[1], g, schemes, config, errors, energy, probe_weight, probe_error)
            del g
            t_err += time.perf_counter() - t0
        table = table_target(model, config)
        if table is not None:
            t0 = time.perf_counter()
            tname, temb, tshared = table
            head_h, head_n = None, 0
            if tshared:
                g = _head_hessian(head, inputs[:jp], norm, proj)
                head_h, head_n = g.H, g.nsamples
                del g
            counts = torch.bincount(torch.cat([s.reshape(-1) for s in hess_seqs]).to(torch.int64),
                                    minlength=temb.num_embeddings)
            tscale = embed_scale_of(temb) or 1.0
            errors[tname], energy[tname], table_probe, probe_error[tname] = _table_measure(
                temb.weight, counts, tscale, head_h, head_n, schemes, config)
            group_of[tname] = tname
            t_err += time.perf_counter() - t0
        seconds["errors"] = t_err
        del inputs

        # --- KL probes ----------------------------------------------------------------------------
        t0 = time.perf_counter()
        hid = _final_hidden(final_probe, norm, proj)
        flat = hid.reshape(-1, hid.shape[-1])
        gen = torch.Generator().manual_seed(seed)
        pos = torch.randperm(flat.shape[0], generator=gen)[: min(probe_positions, flat.shape[0])].sort().values
        head_mod = head[1]
        softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

        def logits_at(h: torch.Tensor) -> torch.Tensor:
            z = head_mod(h.reshape(-1, h.shape[-1])[pos])
            if softcap:
                z = torch.tanh(z / softcap) * softcap
            return z

        ref_logp = F.log_softmax(logits_at(hid).float(), dim=-1)
        groups: dict[str, list[str]] = {}
        for name, _, _ in todo:
            groups.setdefault(group_of[name], []).append(name)
        block_of = {}
        for gname, names in groups.items():
            rest = gname[len(stack_name) + 1:] if gname.startswith(stack_name + ".") else None
            block_of[gname] = int(rest.split(".", 1)[0]) if rest is not None else None
        out_groups = []
        mods = {name: mod for name, mod, _ in todo}
        for gname, names in tqdm(groups.items(), desc="mixed: KL probes", unit="group", disable=not progress):
            saved = {n: mods[n].weight.data for n in names}
            try:
                for n in names:
                    _set_weight(mods[n], probe_weight[n])
                b0 = block_of[gname]
                if b0 is None:
                    h = hid
                else:
                    x = probe_inputs[b0]
                    for b in range(b0, len(layers)):
                        x = runners[b].run(x, jp)
                    h = _final_hidden(x, norm, proj)
                kl = _kl(ref_logp, logits_at(h))
            finally:
                for n in names:
                    mods[n].weight.data = saved[n]
            err = sum(probe_error[n] for n in names)
            out_groups.append(GroupMeasure(gname, names, kl / err if err > 0 else 0.0, kl, err))
        if table is not None:  # the table quantized alone: its lookups (block 0's input) and a shared head
            w = temb.weight
            ids = chunks[jp].ids
            if probe_inputs[0].shape[-1] != w.shape[1]:
                raise MeasurementError(
                    f"mixed precision with quantize_embedding: {tname}'s {w.shape[1]}-wide lookups are transformed "
                    f"before the first block (its input is {probe_inputs[0].shape[-1]} wide, e.g. OPT-350m's "
                    "project_in); give the table a fixed scheme under a latency budget, or no budget")
            x = probe_inputs[0] + ((table_probe[ids] - w[ids].float()) * tscale).to(probe_inputs[0].dtype)
            for b in range(len(layers)):
                x = runners[b].run(x, jp)
            h = _final_hidden(x, norm, proj)
            saved = head_mod.weight.data
            try:
                if tshared:
                    head_mod.weight.data = table_probe.to(saved.dtype)
                kl = _kl(ref_logp, logits_at(h))
            finally:
                head_mod.weight.data = saved
            err = probe_error[tname]
            out_groups.append(GroupMeasure(tname, [tname], kl / err if err > 0 else 0.0, kl, err))
        seconds["probes"] = time.perf_counter() - t0
        for r in runners:
            r.close()
    finally:
        model.train(was_training)

    from llmquant.checkpoint import storage_dtype

    fp, desc = model_fingerprint(model, config)
    keys = [scheme_key(s) for s in schemes]
    by_key = dict(zip(keys, schemes))
    layer_list = []
    for name, mod, _ in todo:
        n, k = linear_weight(mod).shape
        layer_list.append(LayerMeasure(name, n, k, errors[name], stored_bytes(config, name, n, k, by_key), energy[name]))
    if table is not None:  # stored once, even when the output layer shares it
        n, k = temb.weight.shape
        layer_list.append(LayerMeasure(tname, n, k, errors[tname], stored_bytes(config, tname, n, k, by_key, table=True),
                                       energy[tname]))
    seconds["total"] = time.perf_counter() - t_start
    tokens = sum(int(s.numel()) for s in hess_seqs)
    ids = hashlib.sha256(b"".join(s.to(torch.int64).numpy().tobytes() for s in seqs[:probe_sequences + measure_sequences]))
    return Measurement(
        version=MEASUREMENT_VERSION,
        fingerprint=fp,
        model={"name_or_path": desc["name_or_path"], "model_type": getattr(getattr(model, "config", None), "model_type", None)},
        settings=method_settings(config),
        candidates=keys,
        layers=layer_list,
        groups=out_groups,
        other_bytes=other_bytes(model, config, planned, storage_dtype(model)),
        calibration={"hessian_sequences": len(hess_seqs), "hessian_tokens": tokens, "probe_sequences": len(probe_seqs),
                     "probe_positions": int(pos.numel()), "probe_scheme": scheme_key(PROBE), "rows": ROWS,
                     "tokens_sha256": ids.hexdigest()},
        seconds=seconds,
    )


def _head_hessian(head: tuple[str, nn.Module], inputs: list[torch.Tensor], norm, proj) -> GPTQ:
    """The output layer's Hessian, accumulated on the final hidden states of the last block's outputs."""
    g = GPTQ(head[1], name=head[0])
    for x in inputs:
        g.add_batch(_final_hidden(x, norm, proj))
    return g


def _measure_layer(name, mod, g: GPTQ, schemes, config, errors, energy, probe_weight, probe_error) -> None:
    h = g.H
    w = linear_weight(mod).detach().to(torch.float32)
    if not torch.isfinite(h).all():
        raise MeasurementError(f"{name}: the calibration inputs overflowed (non-finite Hessian)")
    signs = rotation_signs(config, name, w.shape[1])
    d = None
    if signs is not None:  # a rotated layer is quantized as W R against R^T H R (the errors are the same in both bases)
        d = unpack_signs(signs, w.shape[1]).to(w.device)
        w, h = rotate(w, d), rotate_hessian(h, d)
    errors[name] = layer_errors(name, w, h, g.nsamples, schemes, config)
    energy[name] = _output_error(w, h)
    importance = torch.diagonal(h).clone() if config.method == "gptq" else None
    q = _rtn_weight(w, PROBE, config.clip_search, importance)
    probe_error[name] = _output_error(w - q, h)
    probe_weight[name] = q if d is None else unrotate(q, d)
