"""The running batch's KV cache: one left-padded transformers ``DynamicCache`` shared by all rows.

Layout (per attention layer): keys/values ``[B, H_kv, L, D]``. Row ``b`` holds its ``n_b`` real tokens
in the *last* ``n_b`` columns; the columns before are padding, masked out by ``mask`` (int64 [B, L],
1 = real token). Each decode step appends one column for every row (``DynamicLayer.update``), so
between membership changes nothing is copied beyond what transformers itself does.

Why this is exact: padding is masked (zero attention weight), RoPE gets each row's true position
through ``position_ids``, and transformers builds causal and sliding-window masks from cache
*indices*; left padding shifts a row's query and keys by the same amount, so every index difference
(what causal and sliding masks compare) is unchanged.

Membership changes rebuild the cache:

* :meth:`PaddedKVBatch.add` left-pads the newcomers (prefilled together, themselves left-padded) or
  the batch to the longer length and stacks;
* :meth:`PaddedKVBatch.keep` drops finished rows, then the leading columns that are padding in every
  remaining row.

Every layer is rebuilt as a plain full ``DynamicLayer`` (also for sliding-window models: the window is
enforced by the mask, at the cost of keeping the full history). Reading ``layer.keys`` / ``.values``
is the one place this file relies on transformers internals (pinned range in pyproject.toml).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCacheError(TypeError):
    """The model produced a cache the embedded engine cannot batch (e.g. recurrent or KV-sharing layers)."""


def new_cache() -> DynamicCache:
    """An empty cache for one request's prefill: full (non-sliding) dynamic layers only."""
    return DynamicCache()


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise UnsupportedCacheError(
                f"cache layer {i} is {type(layer).__name__} (initialized={getattr(layer, 'is_initialized', None)});"
                " the embedded engine batches only full-attention DynamicLayer caches"
            )
        out.append((layer.keys, layer.values))
    return out


def _left_pad(t: torch.Tensor, cols: int) -> torch.Tensor:
    # t: [B, H, L, D] -> [B, H, cols + L, D]
    return F.pad(t, (0, 0, cols, 0)) if cols else t


class PaddedKVBatch:
    """KV cache, padding mask and next positions for the rows of the running batch."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # int64 [B, L]
        self.positions: torch.Tensor | None = None  # int64 [B]: each row's next position (= real tokens)

    @property
    def size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows as the last rows: ``cache`` holds P rows of T columns, left-padded as
        ``mask`` (int64 [P, T]) says."""
        new = _layers(cache)
        k0 = new[0][0]
        if mask.dim() != 2 or k0.shape[0] != mask.shape[0] or k0.shape[2] != mask.shape[1]:
            raise ValueError(f"add: keys {tuple(k0.shape)} do not match the mask {tuple(mask.shape)} ([P, T])")
        mask = mask.to(device=k0.device, dtype=torch.long)
        positions = mask.sum(dim=1)
        if self.cache is None:
            self.cache = DynamicCache(ddp_cache_data=new)
            self.mask, self.positions = mask, positions
            return
        old = _layers(self.cache)
        if len(old) != len(new):
            raise ValueError(f"add: cache has {len(new)} layers, the batch has {len(old)}")
        length = max(self.length, mask.shape[1])
        pad_old, pad_new = length - self.length, length - mask.shape[1]
        data = [
            (
                torch.cat([_left_pad(ko, pad_old), _left_pad(kn, pad_new)]),
                torch.cat([_left_pad(vo, pad_old), _left_pad(vn, pad_new)]),
            )
            for (ko, vo), (kn, vn) in zip(old, new)
        ]
        self.cache = DynamicCache(ddp_cache_data=data)
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); free everything when ``rows`` is empty."""
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        if rows == list(range(self.size)):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        # first column that is real in some remaining row; everything before it is pure padding
        start = int(torch.nonzero(mask.any(dim=0))[0])
        self.cache = DynamicCache(
            ddp_cache_data=[
                (k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                for k, v in _layers(self.cache)
            ]
        )
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask [B, L+1], position_ids [B, 1]) for one decode step; call :meth:`advance` after it."""
        ones = torch.ones(self.size, 1, dtype=torch.long, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1), self.positions.view(-1, 1)

    def advance(self, step_mask: torch.Tensor) -> None:
        """Record the decode step that just appended one column to the cache."""
        if self.cache.get_seq_length() != step_mask.shape[1]:
            raise RuntimeError(
                f"cache length {self.cache.get_seq_length()} != mask length {step_mask.shape[1]} after a decode step"
            )
        self.mask = step_mask
        self.positions = self.positions + 1
