"""Which linear layers of a model a config quantizes, and the model-level steps every method shares."""
from __future__ import annotations

import torch
from torch import nn

from llmquant.config import LayerQuant, QuantConfig
from llmquant.formats.packing import num_groups, packed_words
from llmquant.formats.rotation import layer_signs
from llmquant.kernels.registry import PackedWeight
from llmquant.modules.quant_linear import QuantLinear
from llmquant.modules.walk import find_linear_layers, linear_weight, set_submodule


def plan(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module, LayerQuant]]:
    """The linear layers to quantize and their resolved schemes, in model order. An output layer that
    will share the quantized embedding (:func:`head_shares_embedding`) is not among them."""
    shared = head_shares_embedding(model, config)
    out = []
    for name, mod in find_linear_layers(model):
        scheme = config.resolve(name)
        if scheme is not None and not (shared and name == "lm_head"):
            out.append((name, mod, scheme))
    return out


# --- the input embedding (QuantConfig.quantize_embedding) ---------------------------------------
def input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of a transformers model's input embedding, or None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None
    for name, mod in model.named_modules():
        if mod is emb:
            return name, mod
    return None


def embedding_scheme(model: nn.Module, config: QuantConfig) -> LayerQuant | None:
    """The scheme of the input embedding if the config quantizes it (overrides match its module name)."""
    if not config.quantize_embedding:
        return None
    found = input_embedding(model)
    return None if found is None else config.resolve(found[0])


def _tied(model: nn.Module) -> bool:
    """Whether the output layer is tied to the input embedding: the config says so (transformers ties by the
    top-level flag) and, where both hold loaded float weights, they are one tensor (a model being loaded is
    on the meta device and tied only after loading: there the flag decides)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False):
        return False
    found = input_embedding(model)
    w = getattr(getattr(model, "lm_head", None), "weight", None)
    ew = getattr(found[1], "weight", None) if found is not None else None
    loaded = isinstance(w, torch.Tensor) and isinstance(ew, torch.Tensor) and not (w.is_meta or ew.is_meta)
    return not (loaded and w is not ew)


def head_shares_embedding(model: nn.Module, config: QuantConfig) -> bool:
    """Whether the output layer stays tied to the input embedding, quantized once: the model ties them,
    and the config quantizes both with the same scheme."""
    if not (config.quantize_embedding and _tied(model) and getattr(model, "lm_head", None) is not None):
        return False
    head = config.resolve("lm_head")
    return head is not None and head == embedding_scheme(model, config)


def _float_table(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The input embedding to quantize, checked (a float nn.Embedding with finite values)."""
    from llmquant.modules.quant_embedding import QuantEmbedding

    name, emb = input_embedding(model)  # type: ignore[misc]
    if isinstance(emb, QuantEmbedding):
        raise ValueError(f"{name}: the embedding is already quantized")
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{name}: quantize_embedding supports nn.Embedding tables, not {type(emb).__name__}")
    w = emb.weight.detach()
    if w.is_meta or not w.is_floating_point():
        raise ValueError(f"{name}: the embedding weight is {'on the meta device' if w.is_meta else w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: the embedding table holds NaN or infinite values")
    return name, emb


def check_tied_head(model: nn.Module, config: QuantConfig) -> None:
    """Refuse quantizing the input embedding of a model whose output layer is tied to it while the head stays
    float: the head would keep the float table, so the checkpoint (and memory) would hold the table twice,
    float and quantized, and grow instead of shrinking."""
    if not (config.quantize_embedding and getattr(model, "lm_head", None) is not None and _tied(model)):
        return
    if config.resolve("lm_head") is not None:
        return
    found = input_embedding(model)
    if found is None:
        return
    w = getattr(found[1], "weight", None)
    grow = ""
    if isinstance(w, torch.Tensor):
        v, d = w.shape
        scheme = embedding_scheme(model, config)
        ng = num_groups(d, scheme.group_size)  # the table as stored: int32 code words, fp16 scales, uint8 zeros
        packed = v * packed_words(d, scheme.bits) * 4 + v * ng * (2 if scheme.sym else 3)
        size = f"{packed / 2**20:.1f} MiB" if packed >= 2**20 else f"{packed / 2**10:.1f} KiB"
        grow = f" by about {size} (its {v}x{d} table, quantized)"
    raise ValueError(
        f"quantize_embedding: the output layer of this model is tied to its input embedding ({found[0]}) and "
        f"stays float, so it would keep the float table and the checkpoint would store the table twice and "
        f"grow{grow}. Quantize the head too (quantize_lm_head=True, --quantize-lm-head: with the embedding's "
        f"scheme it shares the quantized table) or leave the embedding float")


def check_embedding(model: nn.Module, config: QuantConfig) -> None:
    """Refuse, before anything changes, an embedding that ``config`` cannot quantize."""
    if embedding_scheme(model, config) is not None:
        _float_table(model)
        check_tied_head(model, config)


def share_table_from_head(model: nn.Module, packed: PackedWeight, scheme: LayerQuant, config: QuantConfig) -> None:
    """The tied output layer was quantized (``packed``, no perm): the input embedding becomes a
    QuantEmbedding of the same codes and the head a TiedQuantHead of it."""
    from llmquant.modules.quant_embedding import QuantEmbedding, TiedQuantHead

    if packed.perm is not None:
        raise ValueError("a table shared by the embedding and the head cannot store an act-order perm")
    name, emb = _float_table(model)
    q = QuantEmbedding.from_float(emb, packed.qweight, packed.scales, packed.zeros, scheme,
                                  act_int8=config.activations == "dynamic_int8")
    set_submodule(model, name, q)
    model.lm_head = TiedQuantHead(q)
    drop_tied_keys(model)


def quantize_embedding(model: nn.Module, config: QuantConfig, shared_by_method: bool = False) -> dict:
    """Quantize the input embedding in place (round to nearest, with the config's clipping search), and
    make a tied output layer share it (:func:`head_shares_embedding`); a summary. An embedding has no
    input activations, so there is nothing for GPTQ to weight its rounding with, unless the head shares
    it: then ``shared_by_method`` says the method quantizes the table as the head (GPTQ, with the head's
    Hessian; :func:`share_table_from_head`) and nothing is done here."""
    from llmquant.modules.quant_embedding import QuantEmbedding, TiedQuantHead
    from llmquant.quantizers.rtn import quantize_weight_rtn

    scheme = embedding_scheme(model, config)
    if scheme is None:
        return {}
    name, emb = _float_table(model)
    shared = head_shares_embedding(model, config)
    if shared and shared_by_method:
        return {"embedding": name, "embedding_scheme": str(scheme), "head_shares_embedding": True}
    w = emb.weight.detach()
    parts = [quantize_weight_rtn(w[i: i + _EMB_ROWS].float(), scheme, clip=config.clip_search)
             for i in range(0, w.shape[0], _EMB_ROWS)]  # rows are independent: bounded float scratch
    qweight = torch.cat([p.qweight for p in parts])
    scales = torch.cat([p.scales for p in parts])
    zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
    q = QuantEmbedding.from_float(emb, qweight, scales, zeros, scheme, act_int8=config.activations == "dynamic_int8")
    set_submodule(model, name, q)
    if shared:
        model.lm_head = TiedQuantHead(q)
    elif _tied(model) and getattr(model, "lm_head", None) is not None and isinstance(
        getattr(model.lm_head, "weight", None), nn.Parameter
    ) and model.lm_head.weight is emb.weight:
        _untie(model)  # quantized with a scheme of its own by the method, next (check_tied_head: never float)
    return {"embedding": name, "embedding_scheme": str(scheme), "head_shares_embedding": shared}


_EMB_ROWS = 16384


def _untie(model: nn.Module) -> None:
    """Give the output layer its own copy of the (float) table it shares with the input embedding."""
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    cfg = model.config
    cfg.tie_word_embeddings = False
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    if text_cfg is not None and text_cfg is not cfg:
        text_cfg.tie_word_embeddings = False
    drop_tied_keys(model)


def drop_tied_keys(model: nn.Module) -> None:
    """Forget transformers' record (``all_tied_weights_keys``, which ``from_pretrained`` and ``tie_weights``
    act on) of the output layer's tie to the input embedding: llmquant ties or unties the two itself."""
    keys = getattr(model, "all_tied_weights_keys", None)
    found = input_embedding(model)
    if not isinstance(keys, dict) or found is None:
        return
    mine = (f"{found[0]}.", "lm_head.")
    model.all_tied_weights_keys = {t: s for t, s in keys.items() if not (t.startswith(mine) or s.startswith(mine))}


def check_plan(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module, LayerQuant]]:
    """:func:`plan`, refusing a model where the config quantizes nothing (before anything changes)."""
    todo = plan(model, config)
    if not todo:
        n = sum(1 for _ in find_linear_layers(model))
        raise ValueError(
            f"the quantization config selects none of the model's {n} linear layers "
            f"(skip={list(config.skip)}, overrides={list(config.overrides)})"
        )
    return todo


def rotation_signs(config: QuantConfig, name: str, in_features: int) -> torch.Tensor | None:
    """The stored signs (:mod:`llmquant.formats.rotation`) the layer ``name`` is quantized with, or None
    when the config does not rotate it. Deterministic: the solver and :func:`to_quant_linear` agree."""
    return layer_signs(name, in_features) if config.rotates(name, in_features) else None


def to_quant_linear(mod: nn.Module, packed: PackedWeight, config: QuantConfig, name: str) -> QuantLinear:
    """The QuantLinear holding ``packed`` for the float layer ``mod`` (named ``name``: a rotated layer's
    codes were quantized with :func:`rotation_signs`)."""
    bias = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return QuantLinear.from_packed(packed, bias, act_int8=config.activations == "dynamic_int8",
                                   rot_signs=rotation_signs(config, name, packed.in_features),
                                   compact=config.compact_qparams)


def untie_if_quantizing_head(model: nn.Module, config: QuantConfig) -> None:
    """A tied output layer that gets quantized must stop sharing the embedding's float weight.

    Only models with a transformers-style ``config.tie_word_embeddings`` and ``lm_head`` are affected;
    any other module is left as it is.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False):
        return
    head = getattr(model, "lm_head", None)
    if head is None or config.resolve("lm_head") is None or head_shares_embedding(model, config):
        return
    _untie(model)


def dense_weight_check(name: str, mod: nn.Module) -> None:
    """A layer to quantize must hold a real float weight (not meta, not already quantized)."""
    w = linear_weight(mod)
    if w.is_meta:
        raise ValueError(f"{name}: the weight is on the meta device (load the model's weights first)")
    if not w.is_floating_point():
        raise ValueError(f"{name}: weight dtype {w.dtype} is not a float type")
