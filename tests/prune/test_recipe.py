"""Recipes chain registered methods: structured prune -> distill -> quantize on folders, resumable;
a malformed recipe fails before any step runs."""
from __future__ import annotations

import json

import pytest

from llmquant.cli.main import main
from llmquant.recipe import RecipeError, parse_steps, run_recipe


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:8000])
    return path


def _steps(text_file):
    return [
        {"method": "structured", "keep": 0.7, "axes": ["mlp", "heads"], "nsamples": 2, "seqlen": 32, "round_to": 16},
        {"method": "distill", "steps": 2, "grad_accum": 1, "optimizer": "adamw", "eval_every": 0,
         "data": str(text_file), "seqlen": 64, "heldout": 2, "top_k": 16},
        {"method": "gptq", "bits": 4, "group_size": 32, "nsamples": 4, "seqlen": 32},
    ]


def test_prune_distill_quantize_recipe_runs_and_resumes(float_ckpt, tmp_path, text_file, monkeypatch):
    import llmquant.recipe as r
    from llmquant.models import load_model
    from llmquant.modules.quant_linear import QuantLinear

    out = tmp_path / "small-int4"
    result = run_recipe(str(float_ckpt), _steps(text_file), str(out), progress=False)
    assert [s["method"] for s in result["steps"]] == ["structured", "distill", "gptq"]
    assert not (tmp_path / "small-int4.steps").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "llmquant"
    assert cfg["intermediate_size"] < 160  # the pruned shape travelled through distill and quantize
    model, tok = load_model(str(out))
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    # the pruned, distilled, GPTQ INT4 student serves (the embedded engine behind the real HTTP server)
    import httpx

    from tests.serving.helpers import serving

    with serving(model, tok, name="student") as (url, _):
        resp = httpx.post(url + "/v1/completions", json={"model": "student", "prompt": "Hello", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4

    # an interrupted recipe resumes: finished steps are not run again
    calls = []
    real = dict(r._RUNNERS)

    def counting(kind):
        def run(step, src, o, ctx):
            calls.append(step.method)
            if step.method == "gptq" and len(calls) == 3:
                raise KeyboardInterrupt
            return real[kind](step, src, o, ctx)
        return run

    monkeypatch.setattr(r, "_RUNNERS", {k: counting(k) for k in real})
    out2 = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(str(float_ckpt), _steps(text_file), str(out2), progress=False)
    run_recipe(str(float_ckpt), _steps(text_file), str(out2), progress=False)
    assert calls == ["structured", "distill", "gptq", "gptq"]


def test_malformed_recipes_fail_before_anything_runs(tmp_path, float_ckpt):
    bad = [
        ([{"method": "nope"}], "unknown method"),
        ([{"method": "structured", "keep": 2}], "keep"),
        ([{"method": "sparsegpt", "sparsity": 1.0}], "sparsity"),
        ([{"method": "gptq", "bits": 5}], "bits"),
        ([{"method": "distill", "stepz": 3}], "unknown fields"),
        ([{"method": "recover"}], "needs a quantized model"),
        ([{"method": "rtn"}, {"method": "structured"}], "pruning after quantization"),
        ([{"method": "rtn"}, {"method": "distill"}], "recover"),
        ([], "non-empty"),
    ]
    for steps, needle in bad:
        with pytest.raises(RecipeError, match=needle):
            parse_steps(steps)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"method": "structured", "keep": 0}]}))
    assert main(["recipe", str(recipe), str(tmp_path / "o"), "--model", str(float_ckpt)]) == 2
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.steps").exists()


def test_prune_cli_structured_and_sparse(float_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["prune", str(float_ckpt), str(out), "--structured", "--keep", "0.6", "--axes", "mlp,layers",
                 "--nsamples", "2", "--seqlen", "32", "--round-to", "16"]) == 0
    assert "of the decoder-block parameters kept" in capsys.readouterr().out
    out2 = tmp_path / "w"
    assert main(["prune", str(float_ckpt), str(out2), "--method", "wanda", "--pattern", "2:4",
                 "--nsamples", "2", "--seqlen", "32"]) == 0
    assert json.loads((out2 / "config.json").read_text())["sparsity_config"]["sparsity"] == pytest.approx(0.5)
    assert main(["prune", str(float_ckpt), str(tmp_path / "x"), "--method", "wanda", "--sparsity", "1.5"]) == 2
    assert "sparsity must be in (0, 1)" in capsys.readouterr().err
    assert main(["prune", str(float_ckpt), str(tmp_path / "y"), "--structured", "--num-layers", "0"]) == 2
    assert "every" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
