"""Quantization configuration: what to quantize, to how many bits, with which method.

``QuantConfig`` is frozen and validated on construction. It round-trips through the
``quantization_config`` dict stored in a checkpoint's ``config.json`` (``to_dict`` / ``from_dict``),
which carries ``quant_method: "llmquant"`` and the ``format_version`` of the packed layout
(see :mod:`llmquant.formats.packing`).

Module patterns (``skip`` and the keys of ``overrides``) match a module's qualified name
(``model.layers.3.mlp.down_proj``):

* ``"re:<regex>"`` matches when the regex matches the whole name (``re.fullmatch``);
* anything else is a shell-style glob (``fnmatch``) that must match either the whole name or a
  dotted suffix of it, so ``"lm_head"`` and ``"*.down_proj"`` and ``"mlp.down_proj"`` all work.

``overrides`` maps a pattern to the fields that differ for the modules it matches (``bits``,
``group_size``, ``sym``), or to ``"skip"`` to keep those modules in float. The first matching
override wins, in the order given; ``skip`` is checked before the overrides.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from llmquant.formats.packing import SUPPORTED_BITS
from llmquant.formats.rotation import ROTATIONS, rotatable
from llmquant.registry import METHOD_OPTIONS, get_method, method_names

FORMAT_VERSION = 1
QUANT_METHOD = "llmquant"
GROUP_SIZES = (-1, 32, 64, 128)
#: how quantized layers treat their inputs at run time (see QuantConfig.activations)
ACTIVATIONS = ("float", "dynamic_int8")
_OVERRIDE_FIELDS = ("bits", "group_size", "sym")


class QuantConfigError(ValueError):
    """A quantization config (given by a user or read from a checkpoint) is invalid."""


@dataclass(frozen=True)
class LayerQuant:
    """The resolved scheme for one linear layer."""

    bits: int
    group_size: int
    sym: bool

    def __post_init__(self) -> None:
        _check_scheme(self.bits, self.group_size, self.sym, where="layer")


def _check_scheme(bits: Any, group_size: Any, sym: Any, where: str) -> None:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise QuantConfigError(f"{where}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES or isinstance(group_size, bool):
        raise QuantConfigError(f"{where}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if not isinstance(sym, bool):
        raise QuantConfigError(f"{where}: sym must be a bool, got {sym!r}")


def match_pattern(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(1, len(parts)))


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    #: a method registered in :mod:`llmquant.registry` ("rtn", "gptq", ...)
    method: str = "rtn"
    #: GPTQ: quantize columns in order of decreasing Hessian diagonal. ``None``: the method's default
    #: (GPTQ: on, the best measured setting; methods that do not use it: off)
    act_order: bool | None = None
    #: GPTQ with act_order: fix each group's scale before the permuted pass, so groups stay in
    #: input order and no permutation is stored
    static_groups: bool = False
    #: modules kept in float (patterns, see module docstring)
    skip: tuple[str, ...] = ("lm_head",)
    #: per-module differences from the defaults, pattern -> {"bits", "group_size", "sym"} or "skip"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # GPTQ knobs
    damp_percent: float = 0.01
    block_size: int = 128
    #: choose each group's range by searching a clipping factor instead of taking [min, max]; GPTQ
    #: weights the rounding error by each column's input energy (the Hessian diagonal), RTN does not.
    #: ``None``: the method's default (GPTQ: on; RTN: off)
    clip_search: bool | None = None
    true_sequential: bool = True
    #: GPTQ: each layer aims at what the *float* model computes on the calibration tokens,
    #: ``||W X_float - Q X||``, rather than at its own float weight on the inputs the layers already
    #: quantized give it (:mod:`llmquant.quantizers.gptq`), so a layer also makes up for the error that
    #: reaches it. ``None``: the method's default
    float_targets: bool | None = None
    #: store each quantized linear layer's scales as 8-bit codes of a logarithmic grid and its zero points in
    #: as many bits as its codes (:mod:`llmquant.formats.packing`, "Compact group parameters"): about
    #: 0.1 bit a weight less at group size 128. GPTQ and RTN choose the scales on that grid. ``None``: off
    compact_qparams: bool | None = None
    #: quantize the output layer too (it is skipped by default)
    quantize_lm_head: bool = False
    #: quantize the input embedding table too (its scheme: the defaults, or an override matching its module
    #: name, e.g. "embed_tokens"). A tied output layer quantized with the same scheme shares the table
    #: (stored once; GPTQ quantizes it as the head); otherwise the two are untied and the table is
    #: rounded to nearest. Under a bit or size budget the allocation chooses the table's scheme too (under a
    #: latency budget it keeps this one, and a head quantized with it is refused).
    quantize_embedding: bool = False
    #: activations at run time: "float" (as given, fp32 or bf16) or "dynamic_int8" (each row of x
    #: quantized to int8 on the fly and multiplied on integer dot products, where the CPU kernel
    #: can: :mod:`llmquant.kernels.act_int8`). Stored with the checkpoint as its default;
    #: ``LLMQUANT_ACTIVATIONS`` overrides it when a model is run.
    activations: str = "float"
    #: rotate the inputs of the quantized layers before quantizing them: None, or "hadamard" (a
    #: randomized 128-column block Hadamard transform, :mod:`llmquant.formats.rotation`; the layers
    #: whose K is a multiple of 128, never the output layer or the embedding). GPTQ and RTN.
    rotation: str | None = None
    # --- mixed precision (llmquant.mixed): a budget instead of one scheme for every layer ---------
    #: average bits per quantized weight (codes, scales, zeros and perm included) the layers may take;
    #: each layer's scheme is then chosen by measurement and allocation
    target_bpw: float | None = None
    #: or: bytes of the whole checkpoint's safetensors files (every tensor, float ones in the storage dtype,
    #: and an allowance for the files' headers)
    max_size: int | None = None
    #: or: milliseconds the quantized layers may take per decoded token, predicted from a timing
    #: table measured on this machine (:mod:`llmquant.mixed.latency`)
    max_latency: float | None = None
    #: the bit widths and group sizes the allocation chooses from (symmetric and asymmetric each)
    mixed_bits: tuple[int, ...] = (2, 3, 4, 8)
    mixed_group_sizes: tuple[int, ...] = (-1, 32, 64, 128)
    #: set by the allocation on the config it returns (a record, not an instruction): the budget, the
    #: bits per weight reached and the predicted damage. Its ``overrides`` name every layer's scheme.
    mixed: Mapping[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_scheme(self.bits, self.group_size, self.sym, where="QuantConfig")
        try:
            method = get_method(self.method)
        except KeyError:
            raise QuantConfigError(f"QuantConfig: unknown method {self.method!r}; known: {method_names()}") from None
        if method.kind != "quantize":
            raise QuantConfigError(
                f"QuantConfig: {self.method!r} is a {method.kind} method, configured by "
                f"{getattr(method.config_type, '__name__', '?')} (llmquant.prune); quantization methods: "
                f"{method_names()}")
        for option in METHOD_OPTIONS:
            value = getattr(self, option)
            if value is None:
                object.__setattr__(self, option, bool(method.defaults.get(option, False)))
            elif not isinstance(value, bool):
                raise QuantConfigError(f"QuantConfig: {option} must be a bool or None, got {value!r}")
        if self.format_version != FORMAT_VERSION:
            raise QuantConfigError(
                f"QuantConfig: unsupported format_version {self.format_version!r}; "
                f"this llmquant reads version {FORMAT_VERSION}"
            )
        if self.activations not in ACTIVATIONS:
            raise QuantConfigError(f"QuantConfig: activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.static_groups and not self.act_order:
            raise QuantConfigError("QuantConfig: static_groups only makes sense with act_order=True")
        if self.rotation is not None:
            if self.rotation not in ROTATIONS:
                raise QuantConfigError(f"QuantConfig: rotation must be None or one of {ROTATIONS}, got {self.rotation!r}")
            if not method.supports_rotation:
                users = [m for m in method_names() if get_method(m).supports_rotation]
                raise QuantConfigError(f"QuantConfig: method {self.method!r} does not rotate layers; methods that do: {users}")
        for problem in method.problems(self):
            raise QuantConfigError(f"QuantConfig: {problem}")
        self._check_mixed(method)
        if not isinstance(self.quantize_embedding, bool):
            raise QuantConfigError(f"QuantConfig: quantize_embedding must be a bool, got {self.quantize_embedding!r}")
        if self.quantize_embedding and self.quantize_lm_head and self.max_latency is not None:
            raise QuantConfigError("QuantConfig: a latency budget does not price a head that shares the quantized "
                                   "embedding table yet; use target_bpw or max_size, or quantize the head alone")
        if not 0 <= self.damp_percent < 1:
            raise QuantConfigError(f"QuantConfig: damp_percent must be in [0, 1), got {self.damp_percent}")
        if self.block_size <= 0:
            raise QuantConfigError(f"QuantConfig: block_size must be positive, got {self.block_size}")
        if isinstance(self.skip, str):
            raise QuantConfigError("QuantConfig: skip must be a sequence of patterns, not one string")
        object.__setattr__(self, "skip", tuple(self.skip))
        clean: dict[str, Any] = {}
        for pattern, ov in dict(self.overrides).items():
            if ov == "skip" or ov is None:
                clean[pattern] = "skip"
                continue
            if not isinstance(ov, Mapping):
                raise QuantConfigError(f"override {pattern!r}: expected a dict or 'skip', got {ov!r}")
            unknown = set(ov) - set(_OVERRIDE_FIELDS)
            if unknown:
                raise QuantConfigError(
                    f"override {pattern!r}: unknown fields {sorted(unknown)}; allowed: {_OVERRIDE_FIELDS}"
                )
            merged = {f: ov.get(f, getattr(self, f)) for f in _OVERRIDE_FIELDS}
            _check_scheme(merged["bits"], merged["group_size"], merged["sym"], where=f"override {pattern!r}")
            clean[pattern] = dict(ov)
        object.__setattr__(self, "overrides", clean)

    def _check_mixed(self, method) -> None:
        given = [f for f in ("target_bpw", "max_size", "max_latency") if getattr(self, f) is not None]
        if len(given) > 1:
            raise QuantConfigError(f"QuantConfig: give one budget (target_bpw, max_size or max_latency), not {given}")
        if self.max_latency is not None and (
            isinstance(self.max_latency, bool) or not isinstance(self.max_latency, (int, float)) or self.max_latency <= 0
        ):
            raise QuantConfigError(f"QuantConfig: max_latency must be a positive number of milliseconds, got {self.max_latency!r}")
        if self.target_bpw is not None:
            if isinstance(self.target_bpw, bool) or not isinstance(self.target_bpw, (int, float)) or not (
                0 < self.target_bpw < 64
            ):
                raise QuantConfigError(f"QuantConfig: target_bpw must be a number of bits in (0, 64), got {self.target_bpw!r}")
        if self.max_size is not None and (
            isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size <= 0
        ):
            raise QuantConfigError(f"QuantConfig: max_size must be a positive number of bytes, got {self.max_size!r}")
        for name, allowed in (("mixed_bits", SUPPORTED_BITS), ("mixed_group_sizes", GROUP_SIZES)):
            value = getattr(self, name)
            if isinstance(value, (str, int)) or not value:
                raise QuantConfigError(f"QuantConfig: {name} must be a non-empty sequence, got {value!r}")
            value = tuple(value)
            bad = [v for v in value if v not in allowed or isinstance(v, bool)]
            if bad:
                raise QuantConfigError(f"QuantConfig: {name} {bad} not among {allowed}")
            object.__setattr__(self, name, tuple(sorted(set(value))))
        if self.budgeted and not method.supports_mixed:
            users = [m for m in method_names() if get_method(m).supports_mixed]
            raise QuantConfigError(
                f"QuantConfig: method {self.method!r} does not choose schemes under a budget; methods that do: {users}"
            )
        if self.mixed is not None and not isinstance(self.mixed, Mapping):
            raise QuantConfigError(f"QuantConfig: mixed must be a dict (a record of the allocation), got {self.mixed!r}")

    @property
    def budgeted(self) -> bool:
        """Whether each layer's scheme is still to be chosen under a budget (target_bpw, max_size or
        max_latency)."""
        return self.target_bpw is not None or self.max_size is not None or self.max_latency is not None

    @property
    def stores_perm(self) -> bool:
        """Whether quantized layers carry ``perm``: act-order without static groups (the columns are
        stored in the order they were quantized, see :mod:`llmquant.formats.packing`)."""
        return self.act_order and not self.static_groups

    def rotates(self, name: str, in_features: int) -> bool:
        """Whether the quantized linear layer ``name`` with ``in_features`` inputs is stored rotated."""
        return self.rotation is not None and rotatable(in_features) and not match_pattern("lm_head", name)

    def with_kept_float(self, names: Iterable[str]) -> "QuantConfig":
        """This config with the layers ``names`` (full module names) added to ``skip``: a method that
        leaves layers in float records them, so the saved config describes what was stored."""
        extra = [n for n in names if self.resolve(n) is not None]
        return self if not extra else self.replace(skip=self.skip + tuple(extra))

    # --- resolution -------------------------------------------------------------------------
    def resolve(self, name: str) -> LayerQuant | None:
        """The scheme for the linear layer ``name``, or ``None`` if it stays in float."""
        is_head = match_pattern("lm_head", name)
        for pattern in self.skip:
            if match_pattern(pattern, name) and not (is_head and self.quantize_lm_head):
                return None
        for pattern, ov in self.overrides.items():
            if match_pattern(pattern, name):
                if ov == "skip":
                    return None
                return LayerQuant(**{f: ov.get(f, getattr(self, f)) for f in _OVERRIDE_FIELDS})
        return LayerQuant(self.bits, self.group_size, self.sym)

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    # --- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        # a list of [pattern, spec] pairs: the first match wins, and JSON writers that sort object
        # keys (transformers' save_pretrained does) would otherwise change which one that is
        d["overrides"] = [[k, v if v == "skip" else dict(v)] for k, v in self.overrides.items()]
        # the mixed-precision fields and quantize_embedding are written only when they say something, so
        # that a checkpoint that uses neither has the config it had before they existed
        for f in _OPTIONAL_FIELDS:
            if getattr(self, f) == _DEFAULTS[f]:
                del d[f]
            elif isinstance(d[f], tuple):
                d[f] = list(d[f])
        return {"quant_method": QUANT_METHOD, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        d = dict(d)
        method = d.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise QuantConfigError(f"quant_method {method!r} is not {QUANT_METHOD!r}")
        if "format_version" not in d:
            raise QuantConfigError("quantization_config has no format_version")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise QuantConfigError(f"quantization_config has unknown fields {unknown}")
        for f in ("skip", "mixed_bits", "mixed_group_sizes"):
            if isinstance(d.get(f), list):
                d[f] = tuple(d[f])
        ov = d.get("overrides")
        if isinstance(ov, list):
            if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in ov):
                raise QuantConfigError("quantization_config overrides must be a list of [pattern, spec] pairs")
            d["overrides"] = dict((str(k), v) for k, v in ov)
        return cls(**d)


_OPTIONAL_FIELDS = ("target_bpw", "max_size", "max_latency", "mixed_bits", "mixed_group_sizes", "mixed",
                 "quantize_embedding", "rotation", "float_targets", "compact_qparams")  # written only when set (older configs stay as they were)
_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(QuantConfig)}
_DEFAULTS["float_targets"] = False  # what None resolves to for every method: written only when on
_DEFAULTS["compact_qparams"] = False
