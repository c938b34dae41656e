"""Pruning: structured (a smaller dense model) and unstructured/N:M (magnitude, Wanda, SparseGPT).

The methods register themselves in :mod:`llmquant.registry` (kind "prune") when this package is
imported; each is configured by a frozen config (:class:`StructuredConfig`, :class:`SparsityConfig`).
"""
from llmquant.prune.config import PruneConfig, PruneConfigError, SparsityConfig, StructuredConfig
from llmquant.prune import sparse  # noqa: F401  (registers magnitude, wanda, sparsegpt)
from llmquant.prune.structured import StructuredPruneError, build_pruned, make_plan, measure_importance, prune_structured

__all__ = ["PruneConfig", "PruneConfigError", "SparsityConfig", "StructuredConfig", "StructuredPruneError",
           "build_pruned", "make_plan", "measure_importance", "prune_structured"]
