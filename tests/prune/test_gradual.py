"""Gradual pruning: the schedule, rounds that shrink the student, resume after an interruption."""
from __future__ import annotations

import json

import pytest

from llmquant.distill import DataConfig, DistillConfig, TrainConfig
from llmquant.prune import PruneConfigError, StructuredConfig
from llmquant.prune.gradual import gradual, schedule


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:8000])
    return path


def test_cubic_schedule_prunes_most_early_and_ends_at_the_target():
    keeps = schedule(0.5, 4)
    assert keeps[-1] == pytest.approx(0.5)
    steps = [1 - keeps[0]] + [a - b for a, b in zip(keeps, keeps[1:])]
    assert all(s > 0 for s in steps) and steps == sorted(steps, reverse=True)
    assert schedule(0.5, 4, "linear") == pytest.approx([0.875, 0.75, 0.625, 0.5])
    with pytest.raises(PruneConfigError):
        schedule(0.5, 0)
    with pytest.raises(PruneConfigError):
        schedule(0.5, 2, "exponential")


def test_gradual_rounds_shrink_and_resume_after_an_interruption(float_ckpt, tmp_path, text_file, monkeypatch):
    import llmquant.prune.gradual as g

    final = StructuredConfig(keep=0.5, axes=("mlp", "heads"), nsamples=2, seqlen=32, round_to=16)
    dcfg = DistillConfig(train=TrainConfig(steps=4, grad_accum=1, optimizer="adamw", eval_every=0),
                         data=DataConfig(source=str(text_file), seqlen=64, heldout=2, top_k=16), lr=1e-3)
    out = tmp_path / "student"
    real = g.distill
    calls = []

    def failing(teacher, student, o, *a, **k):
        calls.append(o)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped in round 2")
        return real(teacher, student, o, *a, **k)

    monkeypatch.setattr(g, "distill", failing)
    with pytest.raises(KeyboardInterrupt):
        gradual(str(float_ckpt), str(out), final, dcfg, rounds=2, progress=False)
    state = tmp_path / "student.gradual"
    assert (state / "round1-distilled").exists() and not out.exists()
    trained = []
    monkeypatch.setattr(g, "distill", lambda t, st, o, *a, **k: (trained.append(o), real(t, st, o, *a, **k))[1])
    pruned = []
    real_prune = g.prune
    monkeypatch.setattr(g, "prune", lambda src, o, *a, **k: (pruned.append(o), real_prune(src, o, *a, **k))[1])
    summary = gradual(str(float_ckpt), str(out), final, dcfg, rounds=2, progress=False)
    assert (state / "round1-distilled").exists() is False and out.exists()  # state removed, output whole
    hist = summary["history"]
    assert [h["round"] for h in hist] == [1, 2]
    assert hist[0]["kept_fraction"] > hist[1]["kept_fraction"] and hist[1]["kept_fraction"] <= 0.5
    assert hist[0]["kept_fraction"] <= summary["keeps"][0]
    rec = json.loads((out / "llmquant_gradual.json").read_text())
    assert rec["history"] == json.loads(json.dumps(hist))
    # nothing finished was redone: both prunes (round 2's happened before the interruption) and round 1's
    # distillation were reused; only round 2's distillation ran again
    assert pruned == [] and [p.rsplit("/", 1)[-1] for p in trained] == ["round2-distilled"]
    assert all(h["steps"] == 2 for h in hist)


def _block_zeros(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ws = [m.weight for n, m in model.named_modules() if ".layers." in n and hasattr(m, "weight") and m.weight.dim() == 2]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws), model.config


def test_gradual_unstructured_rounds_raise_the_sparsity_and_keep_earlier_zeros(float_ckpt, tmp_path, text_file,
                                                                                monkeypatch):
    import llmquant.prune.gradual as g
    from llmquant.prune import SparsityConfig

    final = SparsityConfig(method="magnitude", sparsity=0.6)
    dcfg = DistillConfig(train=TrainConfig(steps=6, grad_accum=1, optimizer="adamw", eval_every=0),
                         data=DataConfig(source=str(text_file), seqlen=64, heldout=2, top_k=16), lr=1e-2)
    students = []
    real = g.distill
    monkeypatch.setattr(g, "distill", lambda t, st, o, *a, **k: (students.append(o), real(t, st, o, *a, **k))[1])
    real_rm = g.shutil.rmtree
    monkeypatch.setattr(g.shutil, "rmtree", lambda p, **k: None)  # keep the rounds' folders to look at them
    out = tmp_path / "sparse"
    summary = gradual(str(float_ckpt), str(out), final, dcfg, rounds=3, progress=False)
    monkeypatch.setattr(g.shutil, "rmtree", real_rm)
    hist = summary["history"]
    assert [h["sparsity_target"] for h in hist] == pytest.approx([0.6 * (1 - (2 / 3) ** 3), 0.6 * (1 - (1 / 3) ** 3), 0.6])
    assert [h["sparsity"] for h in hist] == pytest.approx([h["sparsity_target"] for h in hist], abs=1e-3)
    zeros, cfg = _block_zeros(out)
    assert zeros == pytest.approx(0.6, abs=1e-3) and cfg.sparsity_config["target_sparsity"] == 0.6
    # each round's distilled student kept its zeros, and the next round's pruning kept them too
    from transformers import AutoModelForCausalLM

    prev = None
    for s in students[:-1] + [str(out)]:
        m = AutoModelForCausalLM.from_pretrained(s)
        z = {n: p == 0 for n, p in m.named_parameters() if ".layers." in n and p.dim() == 2}
        if prev is not None:
            assert all(bool((prev[n] <= z[n]).all()) for n in z)
        prev = z


def test_gradual_unstructured_refuses_what_has_no_intermediate_size(float_ckpt, tmp_path):
    from llmquant.config import QuantConfig
    from llmquant.prune import SparsityConfig

    dcfg = DistillConfig(train=TrainConfig(steps=2))
    with pytest.raises(PruneConfigError, match="N:M"):
        gradual(str(float_ckpt), str(tmp_path / "a"), SparsityConfig(method="wanda", pattern="2:4"), dcfg)
    with pytest.raises(PruneConfigError, match="quantize"):
        gradual(str(float_ckpt), str(tmp_path / "b"),
                SparsityConfig(method="sparsegpt", quantize=QuantConfig(method="gptq", act_order=False)), dcfg)
    with pytest.raises(PruneConfigError, match="keep_sparsity"):
        gradual(str(float_ckpt), str(tmp_path / "c"), SparsityConfig(method="magnitude"),
                DistillConfig(train=TrainConfig(steps=2), keep_sparsity=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.gradual").exists()


def test_cli_prune_gradual_takes_keep_or_method_with_sparsity(float_ckpt, tmp_path, text_file, capsys):
    from llmquant.cli.main import main

    assert main(["prune-gradual", str(float_ckpt), str(tmp_path / "x"), "--method", "magnitude", "--keep", "0.5"]) == 2
    assert "--sparsity" in capsys.readouterr().err
    assert main(["prune-gradual", str(float_ckpt), str(tmp_path / "x"), "--sparsity", "0.5"]) == 2
    assert "--keep" in capsys.readouterr().err
    rc = main(["prune-gradual", str(float_ckpt), str(tmp_path / "y"), "--method", "magnitude", "--sparsity", "0.5",
               "--rounds", "2", "--steps", "2", "--data", str(text_file), "--seqlen", "64", "--heldout", "2",
               "--top-k", "8", "--grad-accum", "1", "--optimizer", "adamw"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "round 2: 50.0% zeros" in out
