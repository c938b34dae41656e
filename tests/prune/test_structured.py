"""Structured pruning: the pruned model computes exactly what the original computes with the removed
units zeroed; the budget holds; the checkpoint loads in plain transformers; bad input is refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmquant.prune import PruneConfigError, StructuredConfig, StructuredPruneError
from llmquant.prune.structured import build_pruned, inspect_model, make_plan, measure_importance, prune_structured
from tests.quantizers.tiny_models import tiny_calibration, tiny_model


def _masked_original(model, plan, head_dim):
    """The original model with every removed unit's output weights zeroed: removed heads' o_proj
    columns, removed channels' down_proj columns, and both wholly for removed layers (a block whose
    sub-layers output zero passes its input through)."""
    arch = inspect_model(model)
    with torch.no_grad():
        for i, block in enumerate(arch.layers):
            o, down = block.self_attn.o_proj.weight, block.mlp.down_proj.weight
            if i not in plan.layers:
                o.zero_()
                down.zero_()
                continue
            keep_h = torch.zeros(arch.shape.heads, dtype=torch.bool)
            keep_h[plan.heads[i]] = True
            o.view(o.shape[0], arch.shape.heads, head_dim)[:, ~keep_h] = 0
            keep_c = torch.zeros(arch.shape.intermediate, dtype=torch.bool)
            keep_c[plan.channels[i]] = True
            down[:, ~keep_c] = 0
    return model


def _four_layer(family):
    import transformers

    from tests.quantizers.tiny_models import FAMILIES, _config

    torch.manual_seed(0)
    cfg = _config(family)
    cfg.num_hidden_layers = 4
    if family == "gemma3":
        cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    elif getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * 4
    cfg._attn_implementation = "sdpa"
    return FAMILIES[family](cfg).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("sizes", [dict(heads_per_group=1, intermediate_size=64),
                                   dict(kv_heads=1, num_layers=3, intermediate_size=96),
                                   dict(num_layers=2)])
def test_pruned_model_equals_the_original_with_removed_units_zeroed(family, sizes):
    model = _four_layer(family)
    cal = tiny_calibration(4, 32)
    imp = measure_importance(model, cal, progress=False)
    plan = make_plan(model, imp, None, ("mlp", "heads", "kv_heads", "layers"), round_to=8, **sizes)
    small = build_pruned(model, plan)
    s = plan.shape
    assert small.config.num_hidden_layers == s.layers == len(plan.layers)
    assert small.config.num_attention_heads == s.heads and small.config.num_key_value_heads == s.kv_heads
    assert small.config.intermediate_size == s.intermediate
    if family == "gemma3":
        assert small.config.layer_types == [model.config.layer_types[i] for i in plan.layers]
    ids = tiny_calibration(2, 24, seed=9)[0]
    with torch.no_grad():
        got = small(ids).logits
        want = _masked_original(model, plan, inspect_model(model).head_dim)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for b in small.model.layers for p in b.parameters()) == plan.block_params


def test_budget_is_met_and_units_kept_are_the_most_important():
    model = _four_layer("llama")
    imp = measure_importance(model, tiny_calibration(4, 32), progress=False)
    for keep in (0.9, 0.75, 0.5):
        plan = make_plan(model, imp, keep, ("mlp", "heads"), round_to=8)
        assert plan.block_params <= keep * plan.original_block_params
        for i in plan.layers:  # each layer keeps its highest-scoring channels
            kept = imp.mlp[i][plan.channels[i]]
            dropped = torch.ones(len(imp.mlp[i]), dtype=torch.bool)
            dropped[plan.channels[i]] = False
            if dropped.any():
                assert kept.min() >= imp.mlp[i][dropped].max()
    # a smaller budget never costs less
    costs = [make_plan(model, imp, k, ("mlp", "heads"), round_to=8).predicted_cost for k in (0.9, 0.75, 0.5)]
    assert costs == sorted(costs)


def test_grouped_query_attention_keeps_whole_groups():
    model = _four_layer("llama")  # 4 query heads in 2 KV groups
    imp = measure_importance(model, tiny_calibration(4, 32), progress=False)
    plan = make_plan(model, imp, None, ("kv_heads",), kv_heads=1)
    for i in plan.layers:
        g = plan.kv_heads[i][0]
        assert plan.heads[i] == [2 * g, 2 * g + 1]  # the KV head goes with exactly its queries


def test_bad_sizes_and_budgets_are_refused_with_the_reason():
    model = _four_layer("llama")
    imp = measure_importance(model, tiny_calibration(2, 16), progress=False)
    with pytest.raises(StructuredPruneError, match="every layer"):
        make_plan(model, imp, None, ("layers",), num_layers=0)
    with pytest.raises(StructuredPruneError, match="every query head"):
        make_plan(model, imp, None, ("heads",), heads_per_group=0)
    with pytest.raises(StructuredPruneError, match="smallest such model keeps"):
        make_plan(model, imp, 0.05, ("heads",))
    for keep in (0, -0.5, 1.5):
        with pytest.raises(PruneConfigError, match="keep"):
            StructuredConfig(keep=keep)
    with pytest.raises(PruneConfigError, match="every"):
        StructuredConfig(num_layers=0)
    with pytest.raises(PruneConfigError, match="axes"):
        StructuredConfig(axes=("embedding",))


@pytest.mark.parametrize("family,needle", [("gpt2", "c_attn"), ("opt", "fc1")])
def test_unsupported_attention_layout_is_named(family, needle):
    with pytest.raises(StructuredPruneError, match="lacks") as e:
        prune_structured(tiny_model(family), tiny_calibration(2, 16), 0.75, progress=False)
    assert type(tiny_model(family)).__name__ in str(e.value) and needle in str(e.value)


def test_prune_job_writes_a_plain_checkpoint_and_nothing_on_error(float_ckpt, tmp_path):
    from llmquant.prune.jobs import RECORD, prune

    out = tmp_path / "pruned"
    summary = prune(str(float_ckpt), str(out), StructuredConfig(keep=0.6, axes=("mlp", "heads", "layers"),
                                                                nsamples=4, seqlen=32, round_to=16),
                    progress=False)
    assert summary["kept_fraction"] <= 0.6
    rec = json.loads((out / RECORD).read_text())
    assert rec["shape"] == summary["shape"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["intermediate_size"] == summary["shape"]["intermediate"]
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert 'llmquant' not in sys.modules\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    # (cwd: not the repo root, whose kernels/ folder would pass for the hub package "kernels")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # an impossible budget fails before anything is written
    bad = tmp_path / "bad"
    with pytest.raises(StructuredPruneError):
        prune(str(float_ckpt), str(bad), StructuredConfig(keep=0.01, axes=("heads",), nsamples=2, seqlen=16),
              progress=False)
    assert not bad.exists()
