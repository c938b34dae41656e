import pytest

from llmquant.config import LayerQuant, QuantConfig, QuantConfigError, match_pattern


def test_defaults_skip_lm_head():
    c = QuantConfig()
    assert c.resolve("model.layers.0.mlp.down_proj") == LayerQuant(4, 128, True)
    assert c.resolve("lm_head") is None
    assert c.replace(quantize_lm_head=True).resolve("lm_head") == LayerQuant(4, 128, True)


@pytest.mark.parametrize(
    "pattern,name,hit",
    [
        ("lm_head", "lm_head", True),
        ("down_proj", "model.layers.3.mlp.down_proj", True),
        ("mlp.down_proj", "model.layers.3.mlp.down_proj", True),
        ("*.down_proj", "model.layers.3.mlp.down_proj", True),
        ("model.layers.1*", "model.layers.12.mlp.up_proj", True),
        ("proj", "model.layers.3.mlp.down_proj", False),
        (r"re:model\.layers\.(0|1)\..*", "model.layers.1.self_attn.q_proj", True),
        (r"re:model\.layers\.(0|1)\..*", "model.layers.11.self_attn.q_proj", False),
    ],
)
def test_patterns(pattern, name, hit):
    assert match_pattern(pattern, name) is hit


def test_overrides_first_match_wins_and_skip():
    c = QuantConfig(overrides={"down_proj": {"bits": 8}, "mlp.*": {"group_size": 32}, "layers.0.*": "skip"})
    assert c.resolve("model.layers.2.mlp.down_proj") == LayerQuant(8, 128, True)
    assert c.resolve("model.layers.2.mlp.up_proj") == LayerQuant(4, 32, True)
    assert c.resolve("model.layers.0.self_attn.q_proj") is None


def test_roundtrip_dict():
    c = QuantConfig(bits=3, group_size=64, sym=False, method="gptq", act_order=True,
                    overrides={"down_proj": {"bits": 8}, "q_proj": "skip"}, skip=("lm_head", "gate"))
    d = c.to_dict()
    assert d["quant_method"] == "llmquant" and d["format_version"] == 1
    assert QuantConfig.from_dict(d) == c


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(bits=5), "bits must be one of"),
        (dict(group_size=100), "group_size must be one of"),
        (dict(method="awq"), "unknown method"),
        (dict(format_version=2), "unsupported format_version"),
        (dict(static_groups=True), "static_groups only"),
        (dict(overrides={"x": {"bits": 7}}), "override 'x'"),
        (dict(overrides={"x": {"colour": 1}}), "unknown fields"),
        (dict(skip="lm_head"), "not one string"),
    ],
)
def test_invalid(kwargs, msg):
    with pytest.raises(QuantConfigError, match=msg):
        QuantConfig(**kwargs)


def test_from_dict_rejects_unknown():
    d = QuantConfig().to_dict()
    with pytest.raises(QuantConfigError, match="not 'llmquant'"):
        QuantConfig.from_dict({**d, "quant_method": "gptq"})
    with pytest.raises(QuantConfigError, match="unknown fields"):
        QuantConfig.from_dict({**d, "wat": 1})
    d.pop("format_version")
    with pytest.raises(QuantConfigError, match="no format_version"):
        QuantConfig.from_dict(d)


def test_override_order_survives_sorted_json():
    import json

    c = QuantConfig(overrides={"model.layers.1.self_attn.o_proj": "skip", "*.o_proj": {"bits": 8}})
    text = json.dumps(c.to_dict(), sort_keys=True)  # what save_pretrained writes
    back = QuantConfig.from_dict(json.loads(text))
    assert back == c
    assert back.resolve("model.layers.1.self_attn.o_proj") is None
    assert back.resolve("model.layers.2.self_attn.o_proj") == LayerQuant(8, 128, True)
