"""The method registry, quantizing plain modules, the methods' defaults, and the layering of the package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import llmquant
from llmquant import QuantConfig, QuantConfigError, QuantLinear
from llmquant.quantizers.blocks import UnsupportedModelError
from llmquant.registry import Method, get_method, method_names, register_method

from .tiny_models import tiny_calibration, tiny_model


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))


def test_quantize_any_module():
    """torchao's quantize_ works on any nn.Module; so does ours (it used to fail on model.config)."""
    model = mlp()
    x = torch.randn(5, 64)
    ref = model(x)
    summary = llmquant.quantize(model, QuantConfig(bits=8, group_size=32), progress=False)
    assert summary["layers"] == 2
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert not hasattr(model, "config")
    out = model(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.02  # 8-bit g32


def test_bad_layer_changes_nothing():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"^2: .*non-finite"):
        llmquant.quantize(model, QuantConfig(bits=4, group_size=32), progress=False)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear  # the first layer was not swapped


def test_config_that_selects_nothing_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="selects none of the model's 2 linear layers"):
        llmquant.quantize(model, QuantConfig(skip=("0", "2")), progress=False)


def test_gptq_refuses_a_module_without_decoder_blocks_before_changing_it():
    model = mlp()
    with pytest.raises(UnsupportedModelError, match="no stack of decoder layers"):
        llmquant.quantize(model, QuantConfig(method="gptq", group_size=32), calibration=[torch.zeros(1, 4)],
                          progress=False)
    assert type(model[0]) is nn.Linear


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="'gptq' needs calibration data"):
        llmquant.quantize(tiny_model("llama"), QuantConfig(method="gptq", group_size=32), progress=False)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(QuantConfigError, match=r"unknown method 'awq'; known: \('gptq', 'rtn'\)"):
        QuantConfig(method="awq")
    assert method_names() == ("gptq", "rtn")


def test_best_measured_gptq_settings_are_the_default():
    g = QuantConfig(method="gptq")
    assert g.act_order and g.clip_search and not g.static_groups
    assert QuantConfig(method="gptq", act_order=False, clip_search=False).act_order is False
    r = QuantConfig()
    assert not r.act_order and not r.clip_search
    assert QuantConfig(clip_search=True).clip_search
    with pytest.raises(QuantConfigError, match="method 'rtn' does not use act_order; methods that do: \\['gptq'\\]"):
        QuantConfig(act_order=True)
    hf = llmquant.LlmQuantConfig(method="gptq")
    assert hf.act_order and hf.clip_search
    # what a checkpoint stores is explicit, so a later change of defaults cannot change its meaning
    d = g.to_dict()
    assert d["act_order"] is True and d["clip_search"] is True


def test_cli_defaults_follow_the_method():
    from llmquant.cli.commands import config_from_args
    from llmquant.cli.main import build_parser

    def cfg(*flags):
        return config_from_args(build_parser().parse_args(["quantize", "m", "out", *flags]))

    assert cfg("--method", "gptq").act_order and cfg("--method", "gptq").clip_search
    off = cfg("--method", "gptq", "--no-act-order", "--no-clip-search")
    assert not off.act_order and not off.clip_search
    assert not cfg().act_order and not cfg().clip_search
    assert cfg("--clip-search").clip_search


@pytest.fixture()
def registry_snapshot(monkeypatch):
    import llmquant.registry as reg

    monkeypatch.setattr(reg, "_METHODS", dict(reg._METHODS))


def test_a_new_method_registers_itself_and_everything_uses_it(registry_snapshot):
    calls = []

    @register_method
    class HalfRTN(Method):
        """RTN on the first selected layer only; the rest stay in float (and are recorded as such)."""

        name = "first-only"
        options = frozenset({"clip_search"})
        defaults = {"clip_search": True}

        def apply(self, model, config, calibration, progress):
            calls.append(config)
            cfg = config.replace(method="rtn", clip_search=False)
            todo = [n for n, _, _ in llmquant.quantizers.plan.plan(model, config)]
            rtn_cfg = cfg.replace(skip=tuple(todo[1:]))
            s, _ = llmquant.quantizers.quantize_model(model, rtn_cfg, progress=False)
            return {"method": self.name, "layers": s["layers"], "seconds": s["seconds"], "kept_float": todo[1:]}

    assert "first-only" in method_names()
    config = QuantConfig(method="first-only", group_size=32)
    assert config.clip_search  # its own default
    model = mlp()
    summary = llmquant.quantize(model, config, progress=False)
    assert calls == [config] and summary["layers"] == 1
    assert isinstance(model[0], QuantLinear) and type(model[2]) is nn.Linear
    assert summary["quantization_config"]["skip"] == ["lm_head", "2"]
    from llmquant.cli.main import build_parser

    assert build_parser().parse_args(["quantize", "m", "o", "--method", "first-only"]).method == "first-only"
    with pytest.raises(ValueError, match="already registered"):
        @register_method
        class Other(Method):
            name = "first-only"


def test_gptq_records_layers_outside_the_stack_as_skipped(tmp_path):
    """OPT-350m's project_in/project_out (word_embed_proj_dim != hidden_size) are not calibrated by the
    block-wise pass; the saved config must say they are float, so the checkpoint reloads."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                                 do_layer_norm_before=False)
    model = transformers.OPTForCausalLM(cfg).eval()
    assert model.model.decoder.project_in is not None
    summary = llmquant.quantize(model, QuantConfig(method="gptq", group_size=32), tiny_calibration(n=4),
                                progress=False)
    kept = ["model.decoder.project_out", "model.decoder.project_in"]
    assert sorted(summary["kept_float"]) == sorted(kept)
    assert set(kept) <= set(model.config.quantization_config.skip)
    llmquant.save_quantized(model, tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    ids = torch.cat(tiny_calibration(n=2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert type(back.model.decoder.project_in) is nn.Linear


# --- layering -------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
#: the package's layers, bottom first: a module may import its own layer and the layers below it,
#: never one above (not even inside a function); the top-level ``llmquant`` is the facade
LAYERS = [
    ("llmquant.registry", "llmquant.fsutil", "llmquant.formats"),
    ("llmquant.config",),
    ("llmquant.kernels", "llmquant.modules"),
    ("llmquant.quantizers", "llmquant.calibration", "llmquant.prune"),
    ("llmquant.checkpoint", "llmquant.export", "llmquant.models", "llmquant.mixed"),
    ("llmquant.hf",),
    ("llmquant.api", "llmquant.evals", "llmquant.distill", "llmquant.prune.jobs", "llmquant.prune.gradual"),
    ("llmquant.serving", "llmquant.cli", "llmquant.evals.sweep", "llmquant.evals.pareto", "llmquant.evals.recovery",
     "llmquant.evals.pruning", "llmquant.evals.embedding", "llmquant.evals.calibration_text", "llmquant.recipe",
     "llmquant"),
]
FOLDERS = {"kernels": "llmquant.kernels", "serving": "llmquant.serving", "evals": "llmquant.evals",
           "llmquant": "llmquant"}


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (rank, len(p))
    assert best is not None, module
    return best[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The llmquant modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks do not count)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m == "llmquant" or m.startswith("llmquant.")}


def test_dependencies_point_one_way():
    """formats <- config <- kernels/modules <- quantizers <- checkpoint I/O <- transformers integration <-
    public API <- serving/CLI: a lower layer never imports a higher one."""
    bad = []
    for folder in FOLDERS:
        for f in sorted((ROOT / folder).rglob("*.py")):
            me = _module_name(f)
            if me == "llmquant":
                continue  # the facade imports what it re-exports
            for target in _imports(f):
                if _layer(target) > _layer(me):
                    bad.append(f"{me} (layer {_layer(me)}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(bad)
