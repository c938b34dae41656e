"""Running the decoder blocks of a transformers model one at a time, outside the model's forward.

This is the machinery of block-wise calibration (sequential GPTQ in
:mod:`llmquant.quantizers.gptq_model`), written once for every architecture whose decoder blocks sit
in one ``nn.ModuleList`` (Llama, Mistral, Qwen2, Gemma3, GPT-2, OPT, ...):

* :func:`find_layer_stack`: the largest ``nn.ModuleList`` of same-type blocks that contain linear layers.
* :func:`capture`: runs the model on the calibration tokens with every block's ``forward`` replaced
  by a recorder that passes the hidden states through unchanged. It records the inputs of block 0 and
  the extra arguments the model gives *each* block (attention mask, rotary position embeddings, cache
  flags: Gemma3 and Qwen2 give sliding-window and full-attention blocks different masks and
  embeddings, so block 0's are not enough). The last recorder stops the forward, so the final norm
  and the output layer never run.
* :class:`BlockRunner`: runs one block on one chunk of calibration sequences with the captured
  arguments, and can *replay* the outputs of sub-modules that will not change any more (an attention
  module whose projections are all quantized), so later passes over the same block skip that work.
* :func:`probe_block` and :func:`sequential_stages`: the order in which a block calls its linear
  layers, which of them read the very same tensor, and the true-sequential stages derived from that.

Assumptions (checked where possible): blocks take the hidden states as their first argument and return
them as a tensor or as the first element of a tuple; the extra arguments a block receives depend only
on the shape of the token batch (true for calibration batches without padding); blocks are
deterministic in eval mode (no dropout, no cache).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmquant.modules.walk import find_linear_layers, is_linear

#: true-sequential stages per family, by name relative to the block. A family applies when its names
#: are exactly the block's linear layers; otherwise the generic rule of :func:`sequential_stages` is used.
SEQUENTIAL_STAGES: dict[str, list[list[str]]] = {
    # Llama, Mistral, Qwen2, Gemma/Gemma2/Gemma3, SmolLM2
    "llama": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ],
    "opt": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.out_proj"],
        ["fc1"],
        ["fc2"],
    ],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
}

#: a replayed sub-module output may take at most this many times the memory of its input
REPLAY_MAX_RATIO = 2


class UnsupportedModelError(ValueError):
    """The model's structure is not one the block-wise driver understands."""


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (its result is not needed)."""


# --- the layer stack ------------------------------------------------------------------------------
def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block stack: the largest ModuleList of same-type blocks that contain linear layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1 or not any(True for _ in find_linear_layers(mod[0])):
            continue
        size = sum(p.numel() for p in mod.parameters()) + sum(b.numel() for b in mod.buffers())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise UnsupportedModelError(
            f"GPTQ: found no stack of decoder layers in {type(model).__name__} (looked for an "
            "nn.ModuleList of blocks of one type that contain nn.Linear/Conv1D layers)"
        )
    return best[1], best[2]


# --- calibration chunks and capture ---------------------------------------------------------------
@dataclass
class Chunk:
    ids: torch.Tensor  # int64 [C, T]
    key: tuple[int, int]  # (C, T): chunks of one shape share the blocks' extra arguments


def make_chunks(calibration: Iterable[torch.Tensor], chunk_tokens: int, device: torch.device) -> list[Chunk]:
    """Group calibration sequences (token ids [B, T] or [T]) of one length into chunks of about
    ``chunk_tokens`` tokens (at least one sequence each)."""
    rows: dict[int, list[torch.Tensor]] = {}
    for t in calibration:
        if isinstance(t, dict) or hasattr(t, "keys"):
            t = t["input_ids"]
        t = torch.as_tensor(t)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32) or t.shape[1] == 0:
            raise ValueError(f"calibration batches must be token ids [B, T] (int), got {t.dtype} {tuple(t.shape)}")
        for r in t:
            rows.setdefault(int(r.shape[0]), []).append(r.to(torch.int64))
    if not rows:
        raise ValueError("GPTQ: the calibration data is empty")
    chunks = []
    for seqlen, rs in rows.items():
        per = max(1, chunk_tokens // seqlen)
        for i in range(0, len(rs), per):
            ids = torch.stack(rs[i:i + per]).to(device)
            chunks.append(Chunk(ids, (ids.shape[0], seqlen)))
    return chunks


Call = tuple[tuple, dict]  # the positional (after the hidden states) and keyword arguments of a block


@dataclass
class Captured:
    inputs: list[torch.Tensor]  # hidden states entering block 0, one per chunk
    calls: dict[tuple[int, int], list[Call]] = field(default_factory=dict)  # chunk key -> one per block

    def calls_of(self, index: int) -> dict[tuple[int, int], Call]:
        """The arguments of block ``index``, per chunk key."""
        return {key: per_block[index] for key, per_block in self.calls.items()}


def capture(model: nn.Module, layers: nn.ModuleList, chunks: list[Chunk]) -> Captured:
    cap = Captured(inputs=[])
    last = len(layers) - 1
    state: dict[str, Any] = {}

    def recorder(i: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            elif "hidden_states" in kwargs:
                hidden, rest = kwargs.pop("hidden_states"), ()
            else:
                raise UnsupportedModelError(
                    f"GPTQ: block {i} was called without hidden states (positional or hidden_states=)"
                )
            if not isinstance(hidden, torch.Tensor):
                raise UnsupportedModelError(f"GPTQ: block {i} got {type(hidden).__name__}, expected a hidden-state tensor")
            if i == 0:
                cap.inputs.append(hidden)
            calls = cap.calls.setdefault(state["key"], [None] * len(layers))
            if calls[i] is None:
                calls[i] = (rest, kwargs)
            if i == last or all(c is not None for c in calls):
                raise StopForward
            return hidden

        return forward

    saved = [_shadow_forward(layer, recorder(i)) for i, layer in enumerate(layers)]
    try:
        for chunk in chunks:
            state["key"] = chunk.key
            n_before = len(cap.inputs)
            try:
                model(input_ids=chunk.ids, use_cache=False)
            except StopForward:
                pass
            if len(cap.inputs) != n_before + 1:
                raise UnsupportedModelError("GPTQ: the model's forward did not call the first block of its layer stack")
    finally:
        for layer, fwd in zip(layers, saved):
            _restore_forward(layer, fwd)
    for calls in cap.calls.values():
        missing = [i for i, c in enumerate(calls) if c is None]
        if missing:
            raise UnsupportedModelError(f"GPTQ: the model's forward never called blocks {missing} of its layer stack")
    return cap


def _shadow_forward(mod: nn.Module, fn) -> Any:
    # An instance attribute shadows the class's forward for nn.Module.__call__ (hooks still run);
    # a wrapper already installed that way (accelerate hooks) is returned so it can be put back.
    saved = mod.__dict__.get("forward")
    mod.forward = fn
    return saved


def _restore_forward(mod: nn.Module, saved: Any) -> None:
    if saved is None:
        del mod.forward
    else:
        mod.forward = saved


# --- running one block ----------------------------------------------------------------------------
def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _fingerprint(tensors: list[torch.Tensor]) -> tuple:
    fp = []
    for t in tensors:
        f = t.detach().to(torch.float32)
        fp.append((tuple(t.shape), t.dtype, float(f.sum()), float(f.abs().sum()), tuple(f.flatten()[:8].tolist())))
    return tuple(fp)


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, list):
        return [_clone(o) for o in out]
    return out


def _numel(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)):
        return sum(_numel(o) for o in out)
    return 0


class BlockRunner:
    """Runs one block on the calibration chunks with the captured arguments.

    ``freeze(name)`` marks a direct child of the block whose weights and inputs will not change any
    more: from then on its output for each chunk is recorded the first time it runs in full and
    replayed (as a copy, in case the block modifies it in place) when the child is called again on
    that chunk with the same inputs (checked by a
    fingerprint of its tensor arguments: shape, dtype, sums and leading values; on a mismatch it is
    recomputed). Outputs larger than ``REPLAY_MAX_RATIO`` times the largest input (eager attention
    returning its weights) are not kept.
    ``close()`` restores the children and drops the recorded outputs.
    """

    def __init__(self, layer: nn.Module, calls: dict[tuple[int, int], Call], chunks: list[Chunk]) -> None:
        self.layer = layer
        self.calls = calls
        self.chunks = chunks
        self.frozen: dict[str, Any] = {}  # child name -> the forward it shadowed (None: the class's)
        self._chunk: int | None = None
        self._cache: dict[str, dict[int, tuple[tuple, Any]]] = {}

    def run(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """The block's output hidden states on chunk ``j`` (input ``x``)."""
        args, kwargs = self.calls[self.chunks[j].key]
        self._chunk = j
        try:
            out = self.layer(x, *args, **kwargs)
        finally:
            self._chunk = None
        return out[0] if isinstance(out, (tuple, list)) else out

    def run_until_stopped(self, x: torch.Tensor, j: int) -> None:
        """Run the block on chunk ``j`` for its side effects (hooks); a hook may end it early."""
        try:
            self.run(x, j)
        except StopForward:
            pass

    def freeze(self, name: str) -> None:
        if name in self.frozen:
            return
        child = self.layer.get_submodule(name)
        cache: dict[int, tuple[tuple, Any]] = {}
        cls_forward = type(child).forward

        def forward(*args, **kwargs):
            j = self._chunk
            inputs = _tensors(args, kwargs)
            fp = _fingerprint(inputs)
            hit = cache.get(j) if j is not None else None
            if hit is not None and hit[0] == fp:
                return _clone(hit[1])  # a copy: the block may modify the output in place
            out = cls_forward(child, *args, **kwargs)
            if j is not None and inputs and _numel(out) <= REPLAY_MAX_RATIO * max(t.numel() for t in inputs):
                cache[j] = (fp, _clone(out))
            return out

        self._cache[name] = cache
        self.frozen[name] = _shadow_forward(child, forward)

    def close(self) -> None:
        for name, saved in self.frozen.items():
            _restore_forward(self.layer.get_submodule(name), saved)
        self.frozen.clear()
        self._cache.clear()


# --- stages within a block ------------------------------------------------------------------------
@dataclass
class Probe:
    order: dict[str, int]  # first-call index of each linear layer in the block's forward
    source: dict[str, int]  # which input tensor each layer read (same number: the very same tensor)


def probe_block(runner: BlockRunner, linears: dict[str, nn.Module], x: torch.Tensor, j: int = 0) -> Probe:
    """Run the block once on chunk ``j`` and record how it calls its linear layers."""
    order: dict[str, int] = {}
    source: dict[str, int] = {}
    seen: list[torch.Tensor] = []  # keeps the inputs alive so that data pointers stay meaningful

    def hook(rel):
        def pre(mod, args):
            if rel in order:
                return
            inp = args[0]
            order[rel] = len(order)
            for n, prev in enumerate(seen):
                if prev is inp or (
                    prev.data_ptr() == inp.data_ptr() and prev.shape == inp.shape and prev.stride() == inp.stride()
                ):
                    source[rel] = n
                    break
            else:
                source[rel] = len(seen)
                seen.append(inp)

        return pre

    handles = [m.register_forward_pre_hook(hook(rel)) for rel, m in linears.items()]
    try:
        runner.run(x, j)
    finally:
        for h in handles:
            h.remove()
    never = [rel for rel in linears if rel not in order]
    if never:
        raise UnsupportedModelError(f"GPTQ: linear layers {never} are never called in the block's forward")
    return Probe(order, source)


def sequential_stages(linears: dict[str, nn.Module], probe: Probe, true_sequential: bool) -> list[list[str]]:
    """The groups of linear layers quantized together, in order.

    Without ``true_sequential``: one group. Otherwise the family table :data:`SEQUENTIAL_STAGES` when
    one matches the block's layer names exactly, else the generic rule: layers that read the very
    same input tensor form one stage, and stages are ordered by their first call in the forward.
    """
    by_call = sorted(linears, key=probe.order.__getitem__)
    if not true_sequential:
        return [by_call]
    for family in SEQUENTIAL_STAGES.values():
        if sorted(n for stage in family for n in stage) == sorted(linears):
            return [list(stage) for stage in family]
    stages: dict[int, list[str]] = {}
    for rel in by_call:  # dicts keep insertion order: stages come out in order of first call
        stages.setdefault(probe.source[rel], []).append(rel)
    return list(stages.values())


def settled_children(layer: nn.Module, linears: dict[str, nn.Module], probe: Probe, pending: set[str]) -> list[str]:
    """Direct children of the block (not linear layers themselves) whose output can no longer change:
    they contain linear layers, none of them still to be quantized, and every linear layer the block
    calls before them is settled too. ``pending``: layers still to be quantized in this block."""
    first_pending = min((probe.order[p] for p in pending), default=None)
    out = []
    for name, child in layer.named_children():
        if is_linear(child):
            continue
        inside = [rel for rel in linears if rel.startswith(name + ".")]
        if not inside or any(rel in pending for rel in inside):
            continue
        if first_pending is None or max(probe.order[rel] for rel in inside) < first_pending:
            out.append(name)
    return out
