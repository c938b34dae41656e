"""The method registry: every way of compressing a model is a named :class:`Method` that registers itself.

``QuantConfig(method="gptq")`` looks its method up here (an unknown name is an error that lists the
known ones), takes the method's defaults for the options left unset, and lets the method check the
options it does not use. :func:`llmquant.quantizers.quantize_model` then runs the method. Adding a
method means writing one class and decorating it::

    @register_method
    class MyMethod(Method):
        name = "mine"
        options = frozenset({"clip_search"})
        def apply(self, model, config, calibration, progress): ...

Nothing else (config validation, the CLI's ``--method`` choices, the transformers and vLLM loaders)
changes. This module sits at the bottom of the package: it imports nothing from llmquant, and the
methods (in :mod:`llmquant.quantizers`) import it, never the reverse.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable

if TYPE_CHECKING:  # annotations only: the registry must not import the layers above it
    import torch
    from torch import nn

    from llmquant.config import QuantConfig


#: the options of QuantConfig that some methods use and others must leave at their neutral value
METHOD_OPTIONS = ("act_order", "static_groups", "clip_search", "float_targets", "compact_qparams")


class Method:
    """One compression method. Subclasses set the class attributes and implement :meth:`apply`."""

    #: the name in ``QuantConfig.method`` (or a pruning config's ``method``) and in checkpoints
    name: ClassVar[str]
    #: "quantize" (configured by QuantConfig, quantizes in place) or "prune" (configured by the
    #: ``config_type`` the method names, see :mod:`llmquant.prune`; may return a new, smaller model)
    kind: ClassVar[str] = "quantize"
    #: pruning methods: the frozen config class that configures them
    config_type: ClassVar[type | None] = None
    #: one line for ``--help`` and error messages
    description: ClassVar[str] = ""
    #: data-aware methods need calibration token batches
    needs_calibration: ClassVar[bool] = False
    #: the method quantizes each layer with the scheme the config resolves for it, so a budget
    #: (``target_bpw``/``max_size``) can choose those schemes (:mod:`llmquant.mixed`)
    supports_mixed: ClassVar[bool] = False
    #: the method can store layers rotated (``QuantConfig.rotation``, :mod:`llmquant.formats.rotation`)
    supports_rotation: ClassVar[bool] = False
    #: the optional QuantConfig fields (of :data:`METHOD_OPTIONS`) this method reads
    options: ClassVar[frozenset[str]] = frozenset()
    #: values for options the user left unset (``None``); unlisted options default to False
    defaults: ClassVar[dict[str, Any]] = {}

    def problems(self, config: "QuantConfig") -> list[str]:
        """What in ``config`` this method cannot honour; QuantConfig raises with these messages."""
        unused = [o for o in METHOD_OPTIONS if o not in self.options and getattr(config, o)]
        if not unused:
            return []
        users = [m for m in method_names() if set(unused) <= get_method(m).options]
        return [f"method {self.name!r} does not use {', '.join(unused)}; methods that do: {users}"]

    def check_model(self, model: "nn.Module", config: "QuantConfig") -> None:
        """Raise before anything in ``model`` changes if this method cannot quantize it."""

    def apply(
        self,
        model: "nn.Module",
        config: "QuantConfig",
        calibration: "Iterable[torch.Tensor] | None",
        progress: bool,
    ) -> dict:
        """Quantize ``model`` in place; return a summary dict with at least ``method``, ``layers``,
        ``seconds`` and ``kept_float`` (names of layers the config asked for but that stay in float)."""
        raise NotImplementedError


_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a Method needs a non-empty class attribute 'name'")
    unknown = set(cls.options) - set(METHOD_OPTIONS)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown options {sorted(unknown)}; known: {METHOD_OPTIONS}")
    old = _METHODS.get(name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise ValueError(f"method {name!r} is already registered by {type(old).__qualname__}")
    _METHODS[name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method ``name``; ``KeyError`` naming the known methods otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {method_names(None)}") from None


def method_names(kind: str | None = "quantize") -> tuple[str, ...]:
    """The registered methods of ``kind`` ("quantize", "prune"; None: all), sorted."""
    return tuple(sorted(n for n, m in _METHODS.items() if kind is None or m.kind == kind))
