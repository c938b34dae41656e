"""transformers integration: the ``llmquant`` quantization method for ``from_pretrained``.

``import llmquant`` calls :func:`register` once, which adds :class:`LlmQuantConfig` and
:class:`LlmQuantHfQuantizer` to transformers' quantizer registries. Then:

* ``AutoModelForCausalLM.from_pretrained(ckpt)`` on an llmquant checkpoint swaps the quantized linear
  layers for :class:`~llmquant.modules.quant_linear.QuantLinear` on the meta device *before* any weight
  is read, checks every quantized tensor's presence, shape and dtype in the safetensors headers, loads
  the packed tensors as they are (no float weight is built), then checks their values. While
  transformers then initializes what the checkpoint lacks, each QuantLinear shows a stand-in ``weight``
  (see :func:`_guard_weight_init`).
* ``from_pretrained(name, quantization_config=LlmQuantConfig(bits=4, group_size=128))`` loads the float
  model and quantizes it before returning (RTN, or GPTQ with the config's calibration settings), so the
  peak memory is that of the float model.

Tested against transformers >=5.20,<5.24 (the range pinned in pyproject.toml): these hooks move.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers import PretrainedConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmquant.config import QUANT_METHOD, QuantConfig
from llmquant.modules.quant_linear import QuantLinear, prepare_model
from llmquant.modules.walk import linear_weight, set_submodule
from llmquant.mixed import quantize_model
from llmquant.modules.quant_embedding import QuantEmbedding, TiedQuantHead, embed_scale_of
from llmquant.quantizers.plan import (
    drop_tied_keys, embedding_scheme, head_shares_embedding, input_embedding, plan, untie_if_quantizing_head,
)

logger = logging.getLogger(__name__)

_QUANT_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}
#: settings for quantizing on the fly with GPTQ; used while loading, not stored in the checkpoint
_CALIBRATION_FIELDS = ("calibration", "nsamples", "seqlen", "seed", "tokenizer")


class LlmQuantConfig(QuantizationConfigMixin):
    """transformers-facing wrapper of :class:`~llmquant.config.QuantConfig`.

    Takes the same fields (``bits``, ``group_size``, ``sym``, ``method``, ``act_order``, ``skip``,
    ``overrides``, ...). For ``method="gptq"`` on the fly, ``calibration`` (``"builtin"``: a news
    corpus, ``"pydoc"``, a text file, or ``"hf:<dataset>"``; see :mod:`llmquant.calibration`),
    ``nsamples``, ``seqlen``, ``seed`` and ``tokenizer`` (a name or path; defaults to the model's) say
    what to calibrate on.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        calib = {k: kwargs.pop(k) for k in _CALIBRATION_FIELDS if k in kwargs}
        unknown = set(kwargs) - _QUANT_FIELDS
        if unknown:
            raise TypeError(f"LlmQuantConfig: unknown arguments {sorted(unknown)}")
        self.quant_method = QUANT_METHOD
        self.quant = QuantConfig(**{k: tuple(v) if k == "skip" else v for k, v in kwargs.items()})
        self.calibration = calib

    @classmethod
    def from_quant_config(cls, config: QuantConfig) -> "LlmQuantConfig":
        return cls.from_dict(config.to_dict())

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**QuantConfig.from_dict(config_dict).to_dict())
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return self.quant.to_dict()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __getattr__(self, name: str) -> Any:
        # bits, group_size, ... read through to the frozen QuantConfig
        quant = self.__dict__.get("quant")
        if quant is not None and name in _QUANT_FIELDS:
            return getattr(quant, name)
        raise AttributeError(name)


def swap_in_quant_linears(model: torch.nn.Module, config: QuantConfig, bias_dtype: torch.dtype) -> int:
    """Replace each linear layer that ``config`` quantizes by an empty QuantLinear (on the meta device)."""
    untie_if_quantizing_head(model, config)
    todo = plan(model, config)
    for name, mod, scheme in todo:
        n, k = linear_weight(mod).shape
        with torch.device("meta"):
            q = QuantLinear(
                k,
                n,
                scheme,
                bias=getattr(mod, "bias", None) is not None,
                has_perm=config.stores_perm,
                bias_dtype=bias_dtype,
                act_int8=config.activations == "dynamic_int8",
                rotated=config.rotates(name, k),
                compact=config.compact_qparams,
            )
        set_submodule(model, name, q)
    return len(todo) + swap_in_quant_embedding(model, config, bias_dtype)


def swap_in_quant_embedding(model: torch.nn.Module, config: QuantConfig, dtype: torch.dtype) -> int:
    """Replace the input embedding by an empty QuantEmbedding (meta) if ``config`` quantizes it, and a tied
    output layer quantized alike by a TiedQuantHead; returns 1 if it did. transformers' own tying of the
    two is switched off for this model (the checkpoint holds the table once, under the embedding's name)."""
    scheme = embedding_scheme(model, config)
    if scheme is None:
        return 0
    name, emb = input_embedding(model)  # type: ignore[misc]
    if not isinstance(emb, torch.nn.Embedding):
        raise ValueError(f"{name}: the checkpoint's quantized embedding needs an nn.Embedding, the model has "
                         f"{type(emb).__name__}")
    shared = head_shares_embedding(model, config)
    with torch.device("meta"):
        q = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, scheme, padding_idx=emb.padding_idx,
                           embed_scale=embed_scale_of(emb), compute_dtype=dtype,
                           act_int8=config.activations == "dynamic_int8")
    set_submodule(model, name, q)
    if shared:
        model.lm_head = TiedQuantHead(q)
    drop_tied_keys(model)
    return 1


@contextlib.contextmanager
def _weight_stand_ins(model: torch.nn.Module) -> Iterator[None]:
    """Give every QuantLinear of ``model`` a ``weight`` attribute for the duration of the block: an empty
    meta tensor [N, K] marked as loaded (``_is_hf_initialized``), which transformers' init functions
    (``transformers.initialization.normal_`` etc.) leave alone. It is a plain attribute, neither a
    parameter nor a buffer, so it is never saved, loaded or counted, and it is removed afterwards."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for mod in layers:
        stand_in = torch.empty(mod.out_features, mod.in_features, device="meta")
        stand_in._is_hf_initialized = True
        mod.__dict__["weight"] = stand_in
    try:
        yield
    finally:
        for mod in layers:
            mod.__dict__.pop("weight", None)


def _guard_weight_init(model: torch.nn.Module) -> None:
    """Let transformers initialize the weights a pre-quantized checkpoint lacks without tripping over the
    QuantLinear layers.

    After loading, ``from_pretrained`` calls ``model.initialize_weights()``, which calls the model class's
    ``_init_weights(module)`` on every module not yet marked initialized. Some of those reach a child's
    weight by name rather than by type: ``GPT2PreTrainedModel._init_weights`` rescales
    ``module.c_proj.weight`` of every ``GPT2Attention`` / ``GPT2MLP`` (transformers 5.23,
    ``models/gpt2/modeling_gpt2.py``), and a QuantLinear has no float ``weight``. So, on this model only
    and only while ``initialize_weights`` runs, every QuantLinear shows a stand-in (:func:`_weight_stand_ins`).
    :meth:`LlmQuantHfQuantizer._process_model_after_weight_loading` takes the wrapper off again.
    """
    original = model.initialize_weights

    def initialize_weights(*args: Any, **kwargs: Any) -> Any:
        with _weight_stand_ins(model):
            return original(*args, **kwargs)

    model.__dict__["initialize_weights"] = initialize_weights  # an instance attribute: the class is untouched


class LlmQuantHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = LlmQuantConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)

    @property
    def quant(self) -> QuantConfig:
        return self.quantization_config.quant

    def validate_environment(self, device_map=None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("llmquant checkpoints cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        from llmquant.checkpoint import remember_source_dtype

        files = kwargs.get("checkpoint_files") or []
        remember_source_dtype(model, files)  # saved quantized, float tensors keep the source's dtype
        if not self.pre_quantized:
            return model
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        n = swap_in_quant_linears(model, self.quant, bias_dtype=dtype)
        if n == 0:
            raise ValueError("the llmquant quantization_config quantizes no linear layer of this model")
        files = [f for f in files if str(f).endswith(".safetensors")]
        if not files:
            raise ValueError("llmquant checkpoints are stored as safetensors; no .safetensors file was found")
        from llmquant.checkpoint import verify_quantized_tensors

        verify_quantized_tensors(model, files)
        _guard_weight_init(model)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            from llmquant.checkpoint import validate_loaded

            model.__dict__.pop("initialize_weights", None)  # the loading-time wrapper of _guard_weight_init
            n = validate_loaded(model)
            logger.info("loaded %d llmquant layers", n)
            prepare_model(model)  # kernels chosen and weights repacked now, not in the first forward
            return model
        from llmquant.registry import get_method

        calibration = None
        if get_method(self.quant.method).needs_calibration or self.quant.budgeted:
            calibration = _calibration_for(model, self.quantization_config.calibration)
        _, effective = quantize_model(model, self.quant, calibration=calibration)
        self.quantization_config.quant = effective  # layers the method kept in float are recorded
        attach_quantization_config(model, effective)
        prepare_model(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: float tensors in the source checkpoint's dtype (not the dtype
        the model runs in), tied tensors still shared, and that dtype recorded in the metadata."""
        from llmquant.checkpoint import float_state_dict, save_metadata, storage_dtype

        return float_state_dict(model, storage_dtype(model)), save_metadata(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _calibration_for(model, opts: dict[str, Any]):
    from transformers import AutoTokenizer

    from llmquant.calibration import calibration_batches
    from llmquant.models import bos_for_raw_text

    tok_name = opts.get("tokenizer") or model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tok_name) if isinstance(tok_name, str) else tok_name
    return calibration_batches(
        tokenizer,
        source=opts.get("calibration", "builtin"),
        nsamples=opts.get("nsamples", 128),
        seqlen=opts.get("seqlen", 512),
        seed=opts.get("seed", 0),
        bos=bos_for_raw_text(str(model.name_or_path), tokenizer),
    )


def is_transformers_model(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "config", None), PretrainedConfig)


def attach_quantization_config(model, config: QuantConfig) -> None:
    """Mark an in-memory quantized transformers model so that ``save_pretrained`` writes an llmquant
    checkpoint. Other modules carry no Hugging Face config and are left as they are."""
    if not is_transformers_model(model):
        return
    hf_config = LlmQuantConfig.from_quant_config(config)
    model.config.quantization_config = hf_config
    if hasattr(model, "save_pretrained"):
        model.hf_quantizer = LlmQuantHfQuantizer(hf_config, pre_quantized=True)
        model.is_quantized = True
        model.quantization_method = QUANT_METHOD


def register() -> None:
    """Add the llmquant method to transformers' registries (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = LlmQuantConfig
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = LlmQuantHfQuantizer
