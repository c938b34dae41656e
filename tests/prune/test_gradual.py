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
