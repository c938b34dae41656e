"""Walking a model's modules: which are linear layers, their weights as [N, K], swapping one out.

A leaf module (torch only): the quantizers, the transformers loader and the tests all use it, and it
uses none of them.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight [K, N], y = x @ W + b
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight")


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [N, K] (out_features, in_features), whatever the module type."""
    return mod.weight.t() if _is_conv1d(mod) else mod.weight


def find_linear_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules(prefix=prefix):
        if is_linear(mod):
            yield name, mod


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
