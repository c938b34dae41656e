"""``LlmQuantLinearMethod``: one quantized vLLM linear layer (plain, fused, sharded, or the LM head);
``LlmQuantEmbeddingMethod``: the quantized input embedding table (``quantize_embedding``), which a tied
LM head shares.

Lifecycle (vLLM's): ``create_weights`` declares the checkpoint tensors with vLLM's parameter classes
(the table in :mod:`llmquant.serving.vllm`), vLLM's loaders fill them, ``process_weights_after_loading``
checks their values and lets the kernel registry prepare a kernel, and ``apply`` runs it.

Shapes on one rank: N = rows this rank computes (the sum of the fused parts' rows), K = in_features
this rank sees, G = group size, NG = ceil(K / G), S = number of fused parts, b = bits.

``perm`` (act-order only) is [K] for a plain layer and [S, K] for a fused one: each part (q, k, v, or
gate, up) keeps its own row, because the checkpoint stores one permutation per part. When the rows
agree (GPTQ's permutation depends only on the layer input, which the parts share) the layer runs as
one kernel call; when they differ, each part runs as its own call and the outputs are concatenated.
Not supported: an act-order layer that the checkpoint itself stores fused (one ``gate_up_proj`` with
one ``perm``, as Phi-3 does); vLLM's loader cuts such tensors by output rows, which ``perm`` has not.

``rot_signs`` (``rotation="hadamard"``, :mod:`llmquant.formats.rotation`) is uint8 [K/8] for a plain
layer and [S, K/8] for a fused one, one row per part like ``perm``; parts whose signs agree (llmquant
draws one vector for the layers that read one input) rotate x once and run as one call. A row-parallel
rank keeps the bytes of its K columns, which must be whole 128-column rotation blocks. The rotation
runs in ``apply`` before the kernel (x R, then the act-order gather and the packed GEMM), as the
embedded engine's QuantLinear does.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from llmquant.config import LayerQuant
from llmquant.formats.packing import (BLOCK, decode_qparams, dequantize_packed, num_groups, packed_words,
                                      packed_zero_bytes)
from llmquant.formats.rotation import BLOCK as ROT_BLOCK
from llmquant.formats.rotation import unpack_signs, unrotate
from llmquant.kernels.cpu import rotate_input
from llmquant.kernels.registry import PackedWeight, select_kernel
from llmquant.modules.quant_embedding import dequantize_rows

# a child of vLLM's "vllm" logger, which vLLM gives a handler: the kernel choice shows in vLLM's log
logger = logging.getLogger("vllm.llmquant")

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def _part_index(shard_id: Any) -> int:
    """The fused part a loader's ``shard_id`` names ("q"/"k"/"v", or the index of a merged part)."""
    return _QKV_INDEX[shard_id] if isinstance(shard_id, str) else int(shard_id)


class PermParameter(BasevLLMParameter):
    """``perm`` of a (possibly fused) layer: int32 [K], or [S, K] with one row per fused part.

    Filled with -1 so that a part whose ``perm`` never arrived fails the check after loading. K is
    never sharded (act-order layers are refused for row-parallel ranks), so every loader copies whole
    rows.
    """

    def _load_row(self, loaded_weight: torch.Tensor, shard_id: Any) -> None:
        if self.data.dim() == 1:
            self._assert_and_load(loaded_weight)
            return
        row = self.data[_part_index(shard_id)]
        if row.shape != loaded_weight.shape:
            raise ValueError(f"perm of part {shard_id}: shape {tuple(loaded_weight.shape)}, expected {tuple(row.shape)}")
        row.copy_(loaded_weight)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._assert_and_load(loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._assert_and_load(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        self._load_row(loaded_weight, kwargs["shard_id"])

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        self._load_row(loaded_weight, kwargs["shard_id"])


class RotSignsParameter(PermParameter):
    """``rot_signs`` of a (possibly fused) rotated layer: uint8 [K/8], or [S, K/8] with one row per
    fused part, loaded like ``perm``, except that a row-parallel rank keeps the bytes of its K columns.
    Which rows arrived is recorded (every byte value is valid), so that a missing part fails the check
    after loading."""

    def _mark(self, row: int) -> None:
        self.llmquant_loaded = getattr(self, "llmquant_loaded", set()) | {row}

    def _load_row(self, loaded_weight: torch.Tensor, shard_id: Any) -> None:
        super()._load_row(loaded_weight, shard_id)
        self._mark(0 if self.data.dim() == 1 else _part_index(shard_id))

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load_row(loaded_weight, 0)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        shard = self.data.shape[0]
        if loaded_weight.dim() != 1 or loaded_weight.shape[0] != shard * self.tp_size:
            raise ValueError(f"rot_signs: shape {tuple(loaded_weight.shape)}, expected ({shard * self.tp_size},)")
        self.data.copy_(loaded_weight.narrow(0, self.tp_rank * shard, shard))
        self._mark(0)


def check_partition(
    prefix: str, scheme: LayerQuant, *, k_part: int, k_full: int, has_perm: bool, rotated: bool = False,
    compact: bool = False,
) -> None:
    """Refuse a row-parallel cut of K that does not fall on packing blocks and whole groups."""
    if k_part == k_full:
        return
    ranks = k_full // k_part
    problems = []
    if k_part % BLOCK:
        problems.append(f"K per rank ({k_part}) is not a multiple of {BLOCK}, the packing block")
    if scheme.group_size != -1 and k_part % scheme.group_size:
        problems.append(f"K per rank ({k_part}) is not a multiple of the group size {scheme.group_size}")
    if has_perm:
        problems.append("act-order layers (perm) need the whole input on every rank")
    if rotated and k_part % ROT_BLOCK:
        problems.append(f"K per rank ({k_part}) is not a multiple of {ROT_BLOCK}, the rotation block")
    if compact and not scheme.sym:
        problems.append("compact zero points (compact_qparams) pack a row's groups into shared bytes")
    if problems:
        raise ValueError(
            f"llmquant: cannot split {prefix or 'a layer'} (K={k_full}) by input across {ranks} "
            f"tensor-parallel ranks: " + "; ".join(problems) + ". Use a smaller tensor-parallel size."
        )


class LlmQuantLinearMethod(LinearMethodBase):
    def __init__(self, quant_config: Any, scheme: LayerQuant) -> None:
        self.quant_config = quant_config  # LlmQuantVllmConfig
        self.scheme = scheme
        #: whether the layer stores an act-order ``perm`` (an embedding table never does)
        self.has_perm = quant_config.has_perm
        #: whether the checkpoint's layers are rotated where they can be (an embedding table never is)
        self.may_rotate = quant_config.quant.rotation is not None
        #: compact scales and zero points (compact_qparams), decoded after loading
        self.compact = bool(quant_config.quant.compact_qparams)

    # --- declare -----------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        s = self.scheme
        n, k = sum(output_partition_sizes), input_size_per_partition
        has_perm = self.has_perm
        prefix = getattr(layer, "prefix", "")
        rotated = self.may_rotate and self.quant_config.quant.rotates(prefix, input_size)
        check_partition(prefix, s, k_part=k, k_full=input_size, has_perm=has_perm, rotated=rotated,
                        compact=self.compact)
        loader = extra_weight_attrs["weight_loader"]

        # qweight: int32 [N, ceil(K/32)*b], packed along K
        layer.register_parameter(
            "qweight",
            PackedvLLMParameter(
                data=torch.empty(n, packed_words(k, s.bits), dtype=torch.int32),
                output_dim=0,
                input_dim=1,
                packed_dim=1,
                packed_factor=Fraction(BLOCK, s.bits),
                weight_loader=loader,
            ),
        )

        # scales / zeros: [N, NG]; one group per row (G = -1) is one column that every rank keeps
        def group_param(dtype: torch.dtype) -> BasevLLMParameter:
            if s.group_size == -1:
                return ChannelQuantScaleParameter(
                    data=torch.empty(n, 1, dtype=dtype), output_dim=0, weight_loader=loader
                )
            return GroupQuantScaleParameter(
                data=torch.empty(n, num_groups(k, s.group_size), dtype=dtype),
                output_dim=0,
                input_dim=1,
                weight_loader=loader,
            )

        if not self.compact:
            layer.register_parameter("scales", group_param(torch.float16))
            layer.register_parameter("zeros", None if s.sym else group_param(torch.uint8))
        else:  # uint8 scale codes [N, NG], cut like float16 scales; zero points as bytes [N, ZB], cut by rows only
            layer.register_parameter("scales", group_param(torch.uint8))
            zb = packed_zero_bytes(num_groups(input_size, s.group_size), s.bits)
            layer.register_parameter("zeros", None if s.sym else ChannelQuantScaleParameter(
                data=torch.empty(n, zb, dtype=torch.uint8), output_dim=0, weight_loader=loader))
        if has_perm:
            shape = (k,) if len(output_partition_sizes) == 1 else (len(output_partition_sizes), k)
            perm = PermParameter(data=torch.full(shape, -1, dtype=torch.int32), weight_loader=loader)
            layer.register_parameter("perm", perm)
        else:
            layer.register_parameter("perm", None)
        if rotated:
            shape = (k // 8,) if len(output_partition_sizes) == 1 else (len(output_partition_sizes), k // 8)
            layer.register_parameter("rot_signs", RotSignsParameter(data=torch.zeros(shape, dtype=torch.uint8),
                                                                    weight_loader=loader))
        else:
            layer.register_parameter("rot_signs", None)
        layer.llmquant_part_sizes = list(output_partition_sizes)
        layer.llmquant_in_features = k
        layer.llmquant_params_dtype = params_dtype

    # --- after loading -----------------------------------------------------------------------------
    def _packed_parts(self, layer: torch.nn.Module) -> list[tuple[PackedWeight, torch.Tensor | None]]:
        """The layer as one (PackedWeight, rotation signs or None), or one per fused part when their
        perms or signs differ."""
        s = self.scheme
        k = layer.llmquant_in_features
        sizes = layer.llmquant_part_sizes
        qweight, scales = layer.qweight.data, layer.scales.data
        zeros = None if layer.zeros is None else layer.zeros.data
        signs = getattr(layer, "rot_signs", None)
        # one row per fused part (a plain layer's one row stands for all)
        perms = [None] if layer.perm is None else list(layer.perm.data.view(-1, k))
        rots = [None] if signs is None else list(signs.data.view(-1, k // 8))

        def same(rows: list) -> bool:
            return all(r is None or torch.equal(r, rows[0]) for r in rows)

        unpacked: list[tuple[torch.Tensor, torch.Tensor]] = []  # (stored row, its +-1 vector)

        def signs_of(r: torch.Tensor | None) -> torch.Tensor | None:
            """Equal rows get one vector, so that apply rotates x once for the parts that share it."""
            if r is None:
                return None
            d = next((d for row, d in unpacked if torch.equal(row, r)), None)
            if d is None:
                d = unpack_signs(r.contiguous(), k)
                unpacked.append((r, d))
            return d

        if same(perms) and same(rots):
            cuts = [(0, sum(sizes), perms[0], rots[0])]
        else:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            cuts = [(a, a + m, perms[min(i, len(perms) - 1)], rots[min(i, len(rots) - 1)])
                    for i, (a, m) in enumerate(zip(starts, sizes))]
        return [
            (PackedWeight(
                qweight=qweight[a:b],
                scales=scales[a:b],
                zeros=None if zeros is None else zeros[a:b],
                perm=p,
                bits=s.bits,
                group_size=s.group_size,
                in_features=k,
                out_features=b - a,
            ), signs_of(r))
            for a, b, p, r in cuts
        ]

    def _check_values(self, layer: torch.nn.Module) -> None:
        where = getattr(layer, "prefix", "") or "llmquant layer"
        if not torch.isfinite(layer.scales.data).all():
            raise ValueError(f"{where}.scales: non-finite values (NaN or inf) in the checkpoint")
        if layer.zeros is not None and int(layer.zeros.data.max()) > (1 << self.scheme.bits) - 1:
            raise ValueError(
                f"{where}.zeros: value {int(layer.zeros.data.max())} out of range for {self.scheme.bits}-bit codes"
            )
        if layer.perm is not None:
            k = layer.llmquant_in_features
            ident = torch.arange(k, dtype=torch.long, device=layer.perm.device)
            for i, row in enumerate(layer.perm.data.view(-1, k)):
                if not torch.equal(torch.sort(row.long()).values, ident):
                    part = "" if layer.perm.dim() == 1 else f" (fused part {i})"
                    raise ValueError(f"{where}.perm{part}: not a permutation of 0..{k - 1}, or missing")
        signs = getattr(layer, "rot_signs", None)
        if signs is not None:
            rows = 1 if signs.dim() == 1 else signs.shape[0]
            missing = sorted(set(range(rows)) - getattr(signs, "llmquant_loaded", set()))
            if missing:
                part = "" if signs.dim() == 1 else f" (fused part {missing[0]})"
                raise ValueError(f"{where}.rot_signs{part}: missing from the checkpoint, whose config says the layer "
                                 "is rotated (rotation='hadamard')")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "llmquant_tied_to", None) is not None:
            return  # the embedding's tensors: checked and prepared with it
        if self.compact:  # the plain tensors the kernels take (llmquant.formats.packing)
            scales, zeros = decode_qparams(layer.scales.data, None if layer.zeros is None else layer.zeros.data,
                                           self.scheme.bits)
            layer.scales.data = scales
            if zeros is not None:
                layer.zeros.data = zeros
        self._check_values(layer)
        dtype = layer.llmquant_params_dtype
        act_int8 = self.quant_config.act_int8
        runs = []
        for w, d in self._packed_parts(layer):
            kernel = select_kernel(w.spec(dtype, act_int8))
            runs.append((kernel, kernel.prepare(w, act_int8), d))
            if kernel.name not in self.quant_config.kernels_logged:
                self.quant_config.kernels_logged.add(kernel.name)
                logger.info("llmquant: vLLM layers run the %r kernel (first: %s)", kernel.name,
                            w.spec(dtype, act_int8))
        layer.llmquant_runs = runs

    # --- run -----------------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tied = getattr(layer, "llmquant_tied_to", None)
        runs = (layer if tied is None else tied).llmquant_runs
        rotated: dict[int, torch.Tensor] = {}  # x R per sign vector (parts that share signs rotate once)

        def x_for(d: torch.Tensor | None) -> torch.Tensor:
            if d is None:
                return x
            if id(d) not in rotated:
                rotated[id(d)] = rotate_input(x, d.to(x.device))
            return rotated[id(d)]

        if len(runs) == 1:
            kernel, state, d = runs[0]
            return kernel.apply(state, x_for(d), bias)
        y = torch.cat([kernel.apply(state, x_for(d), None) for kernel, state, d in runs], dim=-1)
        return y if bias is None else y + bias

    # --- vLLM extras -------------------------------------------------------------------------------
    def dequantize_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        """The float weight [N, K] in input column order (for vLLM's online re-quantization)."""
        out = []
        for w, d in self._packed_parts(layer):
            wf = dequantize_packed(
                w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size, in_features=w.in_features
            )
            if w.perm is not None:  # stored column j holds input column perm[j]
                wf = torch.empty_like(wf).index_copy_(1, w.perm.long(), wf)
            if d is not None:  # the codes are those of W R
                wf = unrotate(wf.float(), d.to(wf.device)).to(wf.dtype)
            out.append(wf)
        return torch.cat(out, dim=0).to(layer.llmquant_params_dtype)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        """A tied LM head (vLLM's ``ParallelLMHead.tie_weights``) multiplies with the embedding's table: the
        checkpoint stores it once, under the embedding's name (``quantize_embedding``, same scheme)."""
        method = getattr(embed_tokens, "quant_method", None)
        if not isinstance(method, LlmQuantEmbeddingMethod) or method.scheme != self.scheme:
            raise ValueError(
                "llmquant: the LM head is quantized and the model config ties it to the input embedding, but the "
                "embedding is not quantized with the head's scheme; llmquant.quantize unties such a head "
                "(tie_word_embeddings=false) or quantizes both alike (quantize_embedding)")
        for name in ("qweight", "scales", "zeros", "perm", "rot_signs"):
            setattr(layer, name, getattr(embed_tokens, name, None))
        layer.llmquant_tied_to = embed_tokens
        embed_tokens.llmquant_for_logits = True  # its kernel runs this head
        return layer


class LlmQuantEmbeddingMethod(LlmQuantLinearMethod):
    """The input embedding table (``quantize_embedding``), declared and loaded like a linear layer's weight
    [vocabulary, hidden] (vLLM pads the vocabulary with zero rows). ``embedding`` gathers the packed rows of
    the ids and dequantizes only those; ``apply`` (a model that computes its logits with the embedding, as
    vLLM's Gemma 2 does) and a head tied to it run the kernel the registry picks, prepared only when the
    model config ties the output layer to the embedding (otherwise the table is in memory once)."""

    def __init__(self, quant_config: Any, scheme: LayerQuant) -> None:
        super().__init__(quant_config, scheme)
        self.has_perm = False
        self.may_rotate = False  # the table is stored as it is (rotation is of linear layers' inputs)
        self.compact = False  # and with float16 scales (compact_qparams is of linear layers)

    def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        super().create_weights(layer, *args, **kwargs)
        # logits computed with the table (a tied head, or the model's own code, as vLLM's Gemma 2) need a
        # kernel's copy of it; lookups read the packed tensors, so an untied model skips that copy
        layer.llmquant_for_logits = config_ties_embeddings()

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "llmquant_for_logits", True):
            super().process_weights_after_loading(layer)
            return
        self._check_values(layer)
        layer.llmquant_runs = None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(layer, "llmquant_runs", None) is None:
            raise RuntimeError(
                f"llmquant: {getattr(layer, 'prefix', '') or 'the input embedding'}: logits asked of the quantized "
                "embedding, but the model config does not tie the output layer to it (tie_word_embeddings=false), "
                "so no kernel was prepared for the table")
        return super().apply(layer, x, bias)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        w = dequantize_rows(layer.qweight.data, layer.scales.data, None if layer.zeros is None else layer.zeros.data,
                            input_.reshape(-1).long(), bits=self.scheme.bits, group_size=self.scheme.group_size,
                            in_features=layer.llmquant_in_features, dtype=layer.llmquant_params_dtype)
        return w.view(*input_.shape, layer.llmquant_in_features)


def config_ties_embeddings() -> bool:
    """``tie_word_embeddings`` of the model vLLM is building (it sets its config around model construction;
    the top-level config or the text one may carry the flag); True when there is none (layers built alone)."""
    cfg = get_current_vllm_config_or_none()
    model_config = getattr(cfg, "model_config", None)
    if model_config is None:
        return True
    flags = [getattr(c, "tie_word_embeddings") for c in (getattr(model_config, "hf_config", None),
                                                         getattr(model_config, "hf_text_config", None))
             if c is not None and hasattr(c, "tie_word_embeddings")]
    return not flags or any(bool(f) for f in flags)
