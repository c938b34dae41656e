"""A quantized input embedding, and an output layer that shares it.

``QuantEmbedding`` stores the embedding table [V, D] in the same packed format as a linear layer's
weight [N, K] (rows = vocabulary entries, groups along the hidden dimension): the same tensors
(``qweight``, ``scales``, optional ``zeros``; never ``perm``), the same checks. A lookup gathers the
packed rows of the given ids and dequantizes only those, so the float table never exists in memory.
Embeddings that scale their output (Gemma's ``embed_scale``) keep doing so.

``TiedQuantHead`` is the output layer of a model whose head is tied to its embedding when both are
quantized with the same scheme: it owns no tensor and multiplies with the embedding's codes through
the kernel registry (the CPU kernel keeps its own repacked copy, so the table is in memory twice at
4 bits, together about half of one fp16 copy). The checkpoint stores the table once. GPTQ quantizes such a
table as the head (:func:`llmquant.quantizers.plan.share_table_from_head`); a table of its own is rounded
to nearest (:func:`llmquant.quantizers.plan.quantize_embedding`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmquant.config import LayerQuant
from llmquant.formats.packing import dequantize_packed
from llmquant.modules.quant_linear import QuantLinear

#: ids looked up per dequantization call: bounds the float rows built at once
_CHUNK = 8192


class QuantEmbedding(QuantLinear):
    """``nn.Embedding`` with a packed table: ``forward(ids)`` returns ``[*ids.shape, D]`` in
    :attr:`compute_dtype` (the model's float dtype; follows ``model.to(dtype)``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: LayerQuant, *,
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 act_int8: bool = False) -> None:
        # act_int8: dynamic INT8 activations where the table serves as the output layer (a tied head), as
        # for the model's other quantized layers
        super().__init__(embedding_dim, num_embeddings, scheme, bias=False, device=device, act_int8=act_int8)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        #: Gemma-style output scale (``sqrt(hidden_size)``), applied in the compute dtype as the float module does
        self.embed_scale = embed_scale
        self.compute_dtype = compute_dtype
        #: set when a :class:`TiedQuantHead` multiplies with this table (then the kernel is prepared too)
        self.serves_head = False

    @classmethod
    def from_float(cls, emb: nn.Embedding, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, scheme: LayerQuant, act_int8: bool = False) -> "QuantEmbedding":
        mod = cls(emb.num_embeddings, emb.embedding_dim, scheme, padding_idx=emb.padding_idx,
                  embed_scale=embed_scale_of(emb), compute_dtype=emb.weight.dtype, act_int8=act_int8)
        mod.qweight.copy_(qweight)
        mod.scales.copy_(scales)
        if zeros is not None:
            mod.zeros.copy_(zeros)
        return mod

    # The lookup needs the packed rows: they are never released for the kernel's copy.
    def _release_qweight(self, kernel: Any, state: Any) -> None:
        return

    def _apply(self, fn, recurse=True):
        # follow the float dtype the model is cast to (model.half(), .to(torch.bfloat16)); devices move the buffers
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` of the table, dequantized exactly like the format's reference, in
        :attr:`compute_dtype` (embed_scale applied)."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"QuantEmbedding: ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1).to(torch.long)
        if flat.numel():
            lo, hi = torch.stack(torch.aminmax(flat)).tolist()  # one read back to the host
            if lo < 0 or hi >= self.num_embeddings:
                bad = hi if hi >= self.num_embeddings else lo
                raise IndexError(f"QuantEmbedding: id {bad} out of range for a vocabulary of {self.num_embeddings}")
        out = dequantize_rows(self.qweight, self.scales, self.zeros, flat, bits=self.bits,
                              group_size=self.group_size, in_features=self.embedding_dim, dtype=self.compute_dtype)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale).to(self.compute_dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.lookup(ids)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table.T (the tied output layer), through the kernel registry like any QuantLinear."""
        return QuantLinear.forward(self, x)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}"
                + (f", embed_scale={self.embed_scale:.6g}" if self.embed_scale is not None else "")
                + (", activations=dynamic_int8 (as the tied head)" if self.act_int8 and self.serves_head else ""))


class TiedQuantHead(nn.Module):
    """The output layer tied to a :class:`QuantEmbedding`: no tensors of its own. The embedding is held
    outside the module tree (it is saved, moved and cast as the model's embedding), so the state dict
    and ``model.to()`` see it once."""

    def __init__(self, embedding: QuantEmbedding) -> None:
        super().__init__()
        self.__dict__["_embedding"] = embedding  # not a submodule: registered once, under the embedding's name
        embedding.serves_head = True
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    @property
    def embedding(self) -> QuantEmbedding:
        return self.__dict__["_embedding"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.linear(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the quantized embedding"


def dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, rows: torch.Tensor, *,
                    bits: int, group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` (int64 [R]) of a packed matrix, dequantized exactly like the format's reference, as
    [R, in_features] in ``dtype``; a chunk of rows at a time, so no more than that is ever in fp32."""
    out = torch.empty(rows.numel(), in_features, dtype=dtype, device=scales.device)
    for i in range(0, rows.numel(), _CHUNK):
        r = rows[i: i + _CHUNK]
        z = None if zeros is None else zeros.index_select(0, r)
        w = dequantize_packed(qweight.index_select(0, r), scales.index_select(0, r), z, bits=bits,
                              group_size=group_size, in_features=in_features)
        out[i: i + r.numel()] = w.to(dtype)
    return out


def embed_scale_of(emb: nn.Module) -> float | None:
    """The output scale of a scaled embedding (Gemma's ``scalar_embed_scale`` / ``embed_scale``), or None."""
    s = getattr(emb, "scalar_embed_scale", None)
    if s is not None:
        return float(s)
    t = getattr(emb, "embed_scale", None)
    if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_meta:
        return float(t)
    if isinstance(t, (int, float)):
        return float(t)
    return None
