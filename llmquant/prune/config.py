"""Frozen configs of the pruning methods, and the base class of pruning methods in the registry.

Each pruning method registers itself in :mod:`llmquant.registry` with ``kind = "prune"`` and names its
config class; a config looks its method up on construction (an unknown name, a quantization method or
a method of the other config class is an error that says which to use) and validates its fields.

* :class:`StructuredConfig` (method ``structured``): a smaller dense model, see
  :mod:`llmquant.prune.structured`.
* :class:`SparsityConfig` (methods ``magnitude``, ``wanda``, ``sparsegpt``): zeros in the linear layers
  of the decoder blocks, unstructured or N:M, see :mod:`llmquant.prune.sparse`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from llmquant.config import QuantConfig
from llmquant.registry import Method, get_method, method_names


class PruneConfigError(ValueError):
    """A pruning config is invalid."""


@dataclass(frozen=True)
class PruneConfig:
    """Fields every pruning method shares: the method and the calibration text it reads."""

    method: str = ""
    #: calibration source (llmquant.calibration), sequences and their length
    calibration: str = "builtin"
    nsamples: int = 32
    seqlen: int = 512

    def __post_init__(self) -> None:
        cls = type(self).__name__
        try:
            method = get_method(self.method)
        except KeyError as e:
            raise PruneConfigError(f"{cls}: {e.args[0]}") from None
        if method.kind != "prune" or method.config_type is not type(self):
            want = "QuantConfig" if method.kind == "quantize" else getattr(method.config_type, "__name__", "?")
            raise PruneConfigError(f"{cls}: method {self.method!r} is configured by {want}, not {cls}; "
                                   f"{cls} methods: {self.methods()}")
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise PruneConfigError(f"{cls}: nsamples must be a positive int, got {self.nsamples!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise PruneConfigError(f"{cls}: seqlen must be an int >= 2, got {self.seqlen!r}")

    @classmethod
    def methods(cls) -> list[str]:
        return [n for n in method_names("prune") if get_method(n).config_type is cls]

    def get_method(self) -> "PruneMethod":
        return get_method(self.method)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, QuantConfig) else list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "PruneConfig":
        """The config of the method ``d["method"]`` names, from its fields."""
        try:
            method = get_method(d.get("method", ""))
        except KeyError as e:
            raise PruneConfigError(e.args[0]) from None
        if method.kind != "prune":
            raise PruneConfigError(f"method {d.get('method')!r} is not a pruning method")
        return method.config_type.from_fields(d)  # type: ignore[union-attr]

    @classmethod
    def from_fields(cls, d: dict[str, Any]) -> "PruneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise PruneConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        for k, v in d.items():
            if isinstance(v, list):
                d[k] = tuple(v)
        if isinstance(d.get("quantize"), dict):
            d["quantize"] = QuantConfig.from_dict(d["quantize"])
        return cls(**d)


@dataclass(frozen=True)
class StructuredConfig(PruneConfig):
    """Structured pruning into a smaller dense model (:mod:`llmquant.prune.structured`)."""

    method: str = "structured"
    #: fraction of the decoder blocks' parameters kept (None: the explicit sizes below decide)
    keep: float | None = 0.75
    #: which of "mlp", "heads", "kv_heads", "layers" may shrink
    axes: tuple[str, ...] = ("mlp", "heads")
    #: explicit target sizes (fix that axis)
    intermediate_size: int | None = None
    heads_per_group: int | None = None
    kv_heads: int | None = None
    num_layers: int | None = None
    #: MLP widths are multiples of this
    round_to: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        from llmquant.prune.structured import AXES

        if isinstance(self.axes, str):
            object.__setattr__(self, "axes", tuple(a for a in self.axes.split(",") if a))
        object.__setattr__(self, "axes", tuple(self.axes))
        bad = [a for a in self.axes if a not in AXES]
        if bad or not self.axes:
            raise PruneConfigError(f"StructuredConfig: axes must be a non-empty subset of {AXES}, got {self.axes}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))
                                      or not 0 < self.keep <= 1):
            raise PruneConfigError(f"StructuredConfig: keep must be a fraction in (0, 1], got {self.keep!r}")
        sizes = (self.intermediate_size, self.heads_per_group, self.kv_heads, self.num_layers)
        if self.keep is None and all(s is None for s in sizes):
            raise PruneConfigError("StructuredConfig: give keep or at least one explicit size")
        for name in ("intermediate_size", "heads_per_group", "kv_heads", "num_layers"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise PruneConfigError(f"StructuredConfig: {name} must be an int >= 1, got {v!r} "
                                       f"(0 would remove every {name.replace('_', ' ').rstrip('s')})")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PruneConfigError(f"StructuredConfig: round_to must be a positive int, got {self.round_to!r}")

    def sizes(self) -> dict[str, int | None]:
        return {"intermediate_size": self.intermediate_size, "heads_per_group": self.heads_per_group,
                "kv_heads": self.kv_heads, "num_layers": self.num_layers, "round_to": self.round_to}


_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class SparsityConfig(PruneConfig):
    """Unstructured or N:M pruning of the decoder blocks' linear layers (:mod:`llmquant.prune.sparse`)."""

    method: str = "sparsegpt"
    #: fraction of each layer's weights set to zero (unstructured); N:M fixes it at 1 - N/M
    sparsity: float = 0.5
    #: "unstructured", or "N:M" (N weights kept in every M consecutive inputs of a row; "2:4")
    pattern: str = "unstructured"
    #: layers left dense (patterns as in QuantConfig.skip); the embedding and output layer never are pruned
    skip: tuple[str, ...] = ()
    #: SparseGPT: columns per lazy-update block, dampening (as GPTQ)
    block_size: int = 128
    damp_percent: float = 0.01
    #: SparseGPT: quantize in the same pass with these settings (GPTQ; not act-order with N:M)
    quantize: QuantConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "skip", tuple(self.skip))
        nm = self.nm
        if nm is None and self.pattern != "unstructured":
            raise PruneConfigError(f"SparsityConfig: pattern must be 'unstructured' or 'N:M' such as '2:4', "
                                   f"got {self.pattern!r}")
        if nm is not None:
            n, m = nm
            if not 0 < n < m:
                raise PruneConfigError(f"SparsityConfig: pattern {self.pattern!r} needs 0 < N < M")
            object.__setattr__(self, "sparsity", 1 - n / m)
        elif isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0 < self.sparsity < 1:
            raise PruneConfigError(f"SparsityConfig: sparsity must be in (0, 1), got {self.sparsity!r}")
        if not 0 <= self.damp_percent < 1:
            raise PruneConfigError(f"SparsityConfig: damp_percent must be in [0, 1), got {self.damp_percent}")
        if self.block_size <= 0:
            raise PruneConfigError(f"SparsityConfig: block_size must be positive, got {self.block_size}")
        if self.quantize is not None:
            if self.method != "sparsegpt":
                raise PruneConfigError(f"SparsityConfig: quantize in the same pass needs method 'sparsegpt', "
                                       f"not {self.method!r} (prune, then quantize the result)")
            if not isinstance(self.quantize, QuantConfig) or self.quantize.method != "gptq" \
                    or self.quantize.budgeted:
                raise PruneConfigError("SparsityConfig: quantize must be a QuantConfig(method='gptq') without a "
                                       "budget (SparseGPT quantizes with GPTQ's solver)")
            if self.quantize.quantize_embedding:
                raise PruneConfigError("SparsityConfig: quantize_embedding is not supported in SparseGPT's pass; "
                                       "quantize the pruned model with llmquant quantize instead")
            if nm is not None and self.quantize.act_order:
                raise PruneConfigError("SparsityConfig: act-order reorders the columns, which breaks an N:M "
                                       "pattern; use QuantConfig(method='gptq', act_order=False)")

    @property
    def nm(self) -> tuple[int, int] | None:
        m = _NM.match(str(self.pattern))
        return (int(m.group(1)), int(m.group(2))) if m else None


class PruneMethod(Method):
    """A pruning method: ``apply`` returns (model, summary); the model may be a new, smaller one."""

    kind = "prune"

    def problems(self, config) -> list[str]:
        return []

    def apply(self, model, config, calibration, progress):  # type: ignore[override]
        raise NotImplementedError


__all__ = ["PruneConfig", "PruneConfigError", "PruneMethod", "SparsityConfig", "StructuredConfig"]
