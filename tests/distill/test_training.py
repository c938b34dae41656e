"""The training loop, ``recover`` and ``distill`` on tiny models with the real SmolLM2 tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmquant
from llmquant import QuantConfig
from llmquant.calibration import training_windows
from llmquant.cli.main import main
from llmquant.distill import (DataConfig, DistillConfig, KDLoss, RecoverConfig, TokenizerMismatch, TopK,
                              TrainConfig, TrainingDiverged, TrainingInterrupted, distill, recover)
from llmquant.distill.recipes import LOG_FILE
from llmquant.distill.trainable import open_for_training
from llmquant.distill.trainer import Trainer, describe_steps, fit_steps, lr_factor
from llmquant.modules.quant_linear import QuantLinear
from tests.conftest import build_tiny_llama


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """English prose (Python's documentation topics): about 30 windows of 64 tokens."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:8000])
    return path


def _windows(tokenizer, text_file, seqlen=64, n=24):
    return training_windows(tokenizer, str(text_file), seqlen=seqlen, bos=False)[:n]


def _setup(tokenizer, text_file, optimizer="adamw"):
    """A teacher, its INT3 RTN student opened for training, data and targets."""
    teacher = build_tiny_llama(seed=1)
    student = build_tiny_llama(seed=1)
    llmquant.quantize(student, QuantConfig(bits=3, group_size=32), progress=False)
    open_for_training(student)
    win = _windows(tokenizer, text_file)
    with torch.no_grad():
        targets = TopK.from_logits(teacher(win).logits, 16, 1.0)
    params = [p for n, p in student.named_parameters() if n.endswith("log_scale")]
    return student, [{"name": "scales", "params": params, "lr": 3e-2}], win, targets


def _trainer(student, groups, win, targets, state, steps=6, optimizer="adamw", **kw):
    cfg = TrainConfig(steps=steps, grad_accum=2, batch_size=2, optimizer=optimizer, checkpoint_every=2, eval_every=0,
                      **kw)
    return Trainer(student, groups, win[:20], targets[:20], KDLoss(), cfg, state, win[20:], targets[20:],
                   progress=False)


def test_training_windows_are_disjoint_and_start_with_bos(tokenizer, text_file):
    a = training_windows(tokenizer, str(text_file), seqlen=32, bos=False)
    b = training_windows(tokenizer, str(text_file), seqlen=32, bos=True)
    assert a.shape[1] == b.shape[1] == 32 and (b[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(a.flatten()[:31], b[0, 1:])
    joined = training_windows(tokenizer, f"{text_file}+{text_file}", seqlen=32, bos=False)
    assert joined.shape[0] >= 2 * a.shape[0] - 1
    with pytest.raises(ValueError, match="seqlen"):
        training_windows(tokenizer, str(text_file), seqlen=1)


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=100)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] < f[5] < f[9] and max(f) == pytest.approx(1.0) and f[-1] < 0.01


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_training_reduces_held_out_kl_and_resume_gives_the_same_tensors(tokenizer, text_file, tmp_path, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    student, groups, win, targets = _setup(tokenizer, text_file)
    straight = _trainer(student, groups, win, targets, None, optimizer=optimizer).run()
    assert straight["heldout_last"]["kl"] < straight["heldout_first"]["kl"]
    assert straight["optimizer_state_bytes"] > 0 and straight["steps"] == 6
    want = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("log_scale")}

    def make(resumed):
        student, groups, win, targets = _setup(tokenizer, text_file)
        return _trainer(student, groups, win, targets, tmp_path / "state", optimizer=optimizer), student

    resumed, student = _interrupted_then_resumed(make, 3, "step 3 of 6")
    assert resumed["resumed_at"] == 3 and resumed["steps"] == 6
    got = {n: p.detach() for n, p in student.named_parameters() if n.endswith("log_scale")}
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert [e["loss"] for e in resumed["log"]] == [e["loss"] for e in straight["log"]]


def _interrupted_then_resumed(make, at: int, match: str):
    """``make(resumed)`` -> (trainer, student): a fresh setup each call. The first trainer is stopped after
    step ``at`` as Ctrl-C would stop it (the error matching ``match``), its state saved; a second one, a
    fresh process in effect, resumes. Returns the resumed run's summary and student."""
    def stop(step):
        if step == at:
            raise KeyboardInterrupt

    trainer, _ = make(False)
    with pytest.raises(TrainingInterrupted, match=match):
        trainer.run(on_step=stop)
    assert (trainer.state_dir / "state.pt").exists()
    trainer, student = make(True)
    return trainer.run(), student


def test_resume_refuses_the_state_of_another_run(tokenizer, text_file, tmp_path):
    student, groups, win, targets = _setup(tokenizer, text_file)
    _trainer(student, groups, win, targets, tmp_path, steps=2).run()
    student, groups, win, targets = _setup(tokenizer, text_file)
    cfg = TrainConfig(steps=2, grad_accum=2, batch_size=1, optimizer="adamw", eval_every=0)
    with pytest.raises(ValueError, match="another run.*batch_size"):
        Trainer(student, groups, win[:20], targets[:20], KDLoss(), cfg, tmp_path, progress=False).run()


def test_nan_loss_stops_and_keeps_the_last_good_state(tokenizer, text_file, tmp_path):
    student, groups, win, targets = _setup(tokenizer, text_file)

    def blow_up(step):  # what a too-high learning rate does, at a known step
        if step == 2:
            with torch.no_grad():
                groups[0]["params"][0].fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match="stopped at step 3: the loss is nan; the last good state is kept"):
        _trainer(student, groups, win, targets, tmp_path).run(on_step=blow_up)
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["params"].values())


def test_fit_steps_fills_the_time_left():
    # 100 s left at 10 s a step (margin 0.97): 9 more; a plan that fits is left alone; always one step more
    assert fit_steps(500, 3, 30.0, 130.0, 10.0) == 12
    assert fit_steps(12, 3, 30.0, 130.0, 10.0) is None
    assert fit_steps(500, 3, 30.0, 130.0, 8.0, overhead_s=2.0) == 12
    assert fit_steps(500, 3, 200.0, 130.0, 10.0) == 4
    with pytest.raises(ValueError, match="some time"):
        fit_steps(500, 3, 30.0, 130.0, 0.0)


class _Clock:
    """Wall time that passes only where the test says: ``tick`` seconds per micro-batch."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        return self.now


def _timed_trainer(student, groups, win, targets, state, clock, **kw):
    trainer = _trainer(student, groups, win, targets, state, **kw)
    forward = trainer._forward_loss

    def slow_forward(rows):
        clock.now += clock.tick
        return forward(rows)

    trainer._forward_loss = slow_forward
    trainer.clock = clock
    return trainer


def test_a_time_limit_shortens_the_schedule_to_end_at_zero_and_resume_keeps_it(tokenizer, text_file, tmp_path):
    # 10 s a step (2 micro-batches of 5 s), 2 minutes, 100 steps asked: after 3 timed steps, 0.97 * 90 s
    # hold 8 more, so the cosine ends at step 11, inside the limit, instead of being cut at 12 of 100
    student, groups, win, targets = _setup(tokenizer, text_file)
    straight = _timed_trainer(student, groups, win, targets, None, _Clock(5.0), steps=100, max_minutes=2).run()
    assert straight["steps_fitted"] == 11 and straight["steps"] == 11
    assert straight["stopped_by"] == "fitted_schedule" and straight["steps_planned"] == 100
    assert describe_steps(straight) == "11/100 steps (the schedule fitted to the 2-minute limit, 11 steps)"
    f = [e["lr_factor"] for e in straight["log"]]
    assert f[-1] == min(f) < 0.05 and f[0] < f[1] < f[2]  # warm-up (a tenth of 11: one step), then the cosine
    assert [round(lr_factor(s, TrainConfig(steps=100), 11), 6) for s in range(3, 11)] == f[3:]
    want = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("log_scale")}

    # interrupted after the fit, resumed in a process whose steps take twice as long: the same schedule
    def make(resumed):
        student, groups, win, targets = _setup(tokenizer, text_file)
        clock = _Clock(10.0 if resumed else 5.0)
        return _timed_trainer(student, groups, win, targets, tmp_path / "state", clock, steps=100,
                              max_minutes=2), student

    resumed, student = _interrupted_then_resumed(make, 6, "step 6 of 11")
    assert resumed["resumed_at"] == 6 and resumed["steps"] == 11 and resumed["steps_fitted"] == 11
    assert [e["lr_factor"] for e in resumed["log"]] == f
    for n, p in student.named_parameters():
        if n in want:
            assert torch.equal(p.detach(), want[n]), n


def test_the_schedule_is_fitted_again_when_steps_get_faster(tokenizer, text_file):
    # 10 minutes; the first 3 steps take 20 s (a plan of 29), the rest 10 s: refitted from the last 10
    # steps at step 13 (55) and 23 (55 again), then kept for the second half; the run ends inside the limit
    student, groups, win, targets = _setup(tokenizer, text_file)
    clock = _Clock(10.0)

    def faster(step):
        if step == 3:
            clock.tick = 5.0

    summary = _timed_trainer(student, groups, win, targets, None, clock, steps=100, max_minutes=10).run(
        on_step=faster)
    assert summary["steps_fitted"] == summary["steps"] == 55 and clock.now <= 600
    f = [e["lr_factor"] for e in summary["log"]]
    cfg = TrainConfig(steps=100)
    assert f[3:13] == [round(lr_factor(s, cfg, 29), 6) for s in range(3, 13)]
    assert f[13:] == [round(lr_factor(s, cfg, 55), 6) for s in range(13, 55)] and f[-1] < 0.01


def test_without_a_time_limit_the_schedule_is_the_steps_asked(tokenizer, text_file):
    student, groups, win, targets = _setup(tokenizer, text_file)
    summary = _timed_trainer(student, groups, win, targets, None, _Clock(5.0), steps=6).run()
    assert summary["steps_fitted"] is None and summary["steps"] == 6 and summary["stopped_by"] == "steps"
    assert describe_steps(summary) == "6/6 steps (stopped by steps)"


@pytest.mark.parametrize("steps, warned", [(5, False), (6, True)])
def test_a_plan_that_repeats_the_training_text_says_so(tokenizer, text_file, caplog, steps, warned):
    # 20 training windows, 4 a step: 5 steps are one pass, 6 go over the text 1.2 times
    student, groups, win, targets = _setup(tokenizer, text_file)
    with caplog.at_level("WARNING", logger="llmquant.distill.trainer"):
        summary = _trainer(student, groups, win, targets, None, steps=steps).run()
    assert summary["passes"] == steps * 4 / 20
    assert ("go over the 20 training windows 1.2 times" in caplog.text) is warned


def test_a_time_limited_plan_warns_about_repeats_once_with_the_fitted_steps(tokenizer, text_file, caplog):
    # 100 steps asked would be 20 passes; the 2-minute limit fits 11 (2.2 passes), refitted every 10 steps
    student, groups, win, targets = _setup(tokenizer, text_file)
    with caplog.at_level("WARNING", logger="llmquant.distill.trainer"):
        _timed_trainer(student, groups, win, targets, None, _Clock(5.0), steps=100, max_minutes=2).run()
    warnings = [r.getMessage() for r in caplog.records if "training windows" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("11 steps of 4 windows") and "2.2 times" in warnings[0]


# --- recover and distill, end to end --------------------------------------------------------------
def _teacher_model():
    """A tiny random Llama with confident predictions (a random one is near-uniform: nothing to learn)."""
    model = build_tiny_llama(seed=3, tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits ~30x larger
    return model


@pytest.fixture()
def teacher_dir(tmp_path, tokenizer):
    model = _teacher_model()
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def int3_dir(tmp_path, teacher_dir, tokenizer):
    model = _teacher_model()
    llmquant.quantize(model, QuantConfig(bits=3, group_size=32, sym=False), progress=False)
    path = tmp_path / "int3"
    llmquant.save_quantized(model, path, tokenizer)
    return path


def _small(text_file, steps=4, **kw):
    return DataConfig(source=str(text_file), seqlen=64, heldout=2, top_k=16), TrainConfig(
        steps=steps, grad_accum=1, optimizer="adamw", eval_every=0, **kw)


def test_recover_writes_an_ordinary_checkpoint_that_reloads_bit_identically(int3_dir, teacher_dir, tmp_path, text_file):
    data, train = _small(text_file)
    out = tmp_path / "rec"
    summary = recover(str(int3_dir), str(out), str(teacher_dir), RecoverConfig(train=train, data=data, lr=1e-2,
                                                                               train_norms=True), progress=False)
    assert summary["steps"] == 4 and summary["heldout_last"]["kl"] < summary["heldout_first"]["kl"]
    assert not Path(str(out) + ".state").exists()  # state removed after success
    log = json.loads((out / LOG_FILE).read_text())
    assert log["job"] == "recover" and len(log["log"]) == 4
    before, after = load_file(int3_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    scales = [k for k in before if k.endswith(".scales")]
    assert any(not torch.equal(before[k], after[k]) for k in scales)  # the scales trained
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith((".qweight", ".zeros")))
    # an ordinary llmquant checkpoint: loads through transformers, and saves back the same bytes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    llmquant.save_quantized(model, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_blockwise_phase_lowers_every_block_error(int3_dir, teacher_dir, tmp_path, text_file):
    data, train = _small(text_file, steps=1)
    summary = recover(str(int3_dir), str(tmp_path / "o"), str(teacher_dir),
                      RecoverConfig(train=train, data=data, lr=1e-2, blockwise_steps=8, blockwise_windows=4),
                      progress=False)
    blocks = summary["blockwise"]["blocks"]
    assert len(blocks) == 2
    for b in blocks:
        assert 0 < b["rel_error_after"] < b["rel_error_before"], b


def test_max_minutes_covers_the_blockwise_phase_too(int3_dir, teacher_dir, tmp_path, text_file, monkeypatch):
    # the real block phase runs, but reports that it took 10 minutes: with a 5-minute limit on both phases the
    # end-to-end phase gets no time (3 steps without the shared limit); the output is still written
    from llmquant.distill import recipes

    real = recipes.blockwise_phase
    monkeypatch.setattr(recipes, "blockwise_phase", lambda *a, **kw: dict(real(*a, **kw), seconds=600.0))
    data, train = _small(text_file, steps=3, max_minutes=5)
    out = tmp_path / "o"
    summary = recover(str(int3_dir), str(out), str(teacher_dir),
                      RecoverConfig(train=train, data=data, lr=1e-2, blockwise_steps=2, blockwise_windows=4),
                      progress=False)
    assert summary["steps"] == 0 and summary["stopped_by"] == "max_minutes"
    assert len(summary["blockwise"]["blocks"]) == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_recover_reuses_a_teacher_cache_across_runs(int3_dir, teacher_dir, tmp_path, text_file, caplog):
    data, train = _small(text_file, steps=1)
    cache = tmp_path / "teacher.safetensors"
    cfg = RecoverConfig(train=train, data=data, lr=1e-2)
    recover(str(int3_dir), str(tmp_path / "a"), str(teacher_dir), cfg, progress=False, teacher_cache=str(cache))
    assert cache.exists()  # outlives the run (the state folder is removed)
    first = cache.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="llmquant.distill.teacher"):
        recover(str(int3_dir), str(tmp_path / "b"), str(teacher_dir), cfg, progress=False, teacher_cache=str(cache))
    assert "teacher targets read from" in caplog.text and cache.stat().st_mtime_ns == first
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same targets, same seed: the same result


def test_max_windows_draws_a_fixed_subset_of_the_whole_text(int3_dir, teacher_dir, tmp_path, text_file, tokenizer):
    from dataclasses import replace

    from llmquant.distill.recipes import subsample_windows

    windows = training_windows(tokenizer, str(text_file), seqlen=64)
    n = windows.shape[0]
    assert n > 8
    picked = subsample_windows(windows, 6)
    rows = [next(i for i in range(n) if torch.equal(windows[i], r)) for r in picked]
    assert rows == sorted(rows) and len(set(rows)) == 6 and rows[-1] > 5  # in text order, not just the first six
    assert torch.equal(picked, subsample_windows(windows, 6)) and subsample_windows(windows, n + 1) is windows
    data, train = _small(text_file, steps=1)
    cache = tmp_path / "t.safetensors"
    recover(str(int3_dir), str(tmp_path / "a"), str(teacher_dir),
            RecoverConfig(train=train, data=replace(data, max_windows=6)), progress=False, teacher_cache=str(cache))
    assert json.loads(cache.with_suffix(".json").read_text())["windows"] == [6, 64]  # the teacher saw only those
    with pytest.raises(ValueError, match="max_windows=2 leaves no window beside the 2 held out"):
        recover(str(int3_dir), str(tmp_path / "b"), str(teacher_dir),
                RecoverConfig(train=train, data=replace(data, max_windows=2)), progress=False)


def _codes(path):
    from llmquant.formats.packing import unpack_rows

    t = load_file(path / "model.safetensors")
    bits = json.loads((path / "config.json").read_text())["quantization_config"]["bits"]
    return {k: unpack_rows(v, bits, v.shape[1] * 32 // bits).int() for k, v in t.items() if k.endswith(".qweight")}


def test_recover_with_codes_moves_codes_one_step_at_most_and_keeps_the_format(int3_dir, teacher_dir, tmp_path,
                                                                             text_file):
    data, train = _small(text_file, steps=3)
    out = tmp_path / "rec"
    summary = recover(str(int3_dir), str(out), str(teacher_dir),
                      RecoverConfig(train=train, data=data, train_codes=True, lr_codes=0.03, blockwise_steps=40,
                                    blockwise_windows=4), progress=False)
    before, after = load_file(int3_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in before.items()} == {k: (v.dtype, v.shape) for k, v in after.items()}
    c0, c1 = _codes(int3_dir), _codes(out)
    moved = sum(int((c1[k] != c0[k]).sum()) for k in c0)
    assert moved > 0 and max(int((c1[k] - c0[k]).abs().max()) for k in c0) == 1
    # the end-to-end phase keeps the block phase's codes: what moved there is what is stored
    assert summary["blockwise"]["codes_changed"] == moved
    blocks = summary["blockwise"]["blocks"]
    assert any(b["codes_kept"] for b in blocks)
    for b in blocks:  # a block keeps moved codes only where they lower its error
        assert b["rel_error_after"] == (min(b["rel_error_without_codes"], b["rel_error_after"]))
        assert b["rel_error_after"] < b["rel_error_without_codes"] or not b["codes_kept"]
    assert summary["blockwise"]["codes"] == sum(v.numel() for v in c0.values())
    with pytest.raises(ValueError, match="set blockwise_steps"):
        RecoverConfig(train_codes=True)


def _recover_interrupted_at(stop: int, monkeypatch, int3_dir, out, teacher_dir, cfg) -> None:
    """``recover`` stopped by Ctrl-C right after step ``stop`` (its state saved in ``out``.state)."""
    from llmquant.distill import recipes

    real_run = recipes.Trainer.run

    def stopping(self, on_step=None):
        def hook(step):
            if step == stop:
                raise KeyboardInterrupt
        return real_run(self, on_step=hook)

    monkeypatch.setattr(recipes.Trainer, "run", stopping)
    with pytest.raises(TrainingInterrupted):
        recover(str(int3_dir), str(out), str(teacher_dir), cfg, progress=False)
    monkeypatch.setattr(recipes.Trainer, "run", real_run)


def test_recover_with_codes_resumes_with_the_block_phase_codes(int3_dir, teacher_dir, tmp_path, text_file,
                                                              monkeypatch):
    """Interrupted in the end-to-end phase, a resumed run skips the block phase and restores its codes."""
    from llmquant.distill import recipes

    data, train = _small(text_file, steps=4, checkpoint_every=1)
    cfg = RecoverConfig(train=train, data=data, train_codes=True, lr_codes=0.03, blockwise_steps=40,
                        blockwise_windows=4)
    recover(str(int3_dir), str(tmp_path / "straight"), str(teacher_dir), cfg, progress=False)

    _recover_interrupted_at(2, monkeypatch, int3_dir, tmp_path / "resumed", teacher_dir, cfg)
    blocks = []
    monkeypatch.setattr(recipes, "blockwise_phase", lambda *a, **kw: blocks.append(1))
    summary = recover(str(int3_dir), str(tmp_path / "resumed"), str(teacher_dir), cfg, progress=False)
    assert summary["resumed_at"] == 2 and not blocks  # the block phase did not run again
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c0 = _codes(int3_dir)  # codes did move in the block phase, so the resumed run had to restore them
    assert any(not torch.equal(c, c0[k]) for k, c in _codes(tmp_path / "straight").items())


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_end_to_end_codes_move_one_step_at_most_and_resume_exactly(int3_dir, teacher_dir, tmp_path, text_file,
                                                                    monkeypatch, momentum):
    """Codes moving in the end-to-end phase (no block phase): one step at most from the stored ones, the
    count reported is what is stored, and an interrupted run resumes to the same bytes (with momentum:
    its running means are part of the state)."""
    data, train = _small(text_file, steps=6, checkpoint_every=1)
    cfg = RecoverConfig(train=train, data=data, lr=1e-2, end_to_end_codes=True, lr_codes_end_to_end=0.3,
                        momentum_codes_end_to_end=momentum)
    out = tmp_path / "straight"
    summary = recover(str(int3_dir), str(out), str(teacher_dir), cfg, progress=False)
    before, after = load_file(int3_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in before.items()} == {k: (v.dtype, v.shape) for k, v in after.items()}
    c0, c1 = _codes(int3_dir), _codes(out)
    moved = sum(int((c1[k] != c0[k]).sum()) for k in c0)
    assert moved > 0 and max(int((c1[k] - c0[k]).abs().max()) for k in c0) == 1
    assert summary["codes_changed_end_to_end"] == moved and summary["codes"] == sum(v.numel() for v in c0.values())
    assert summary["blockwise"] is None

    _recover_interrupted_at(3, monkeypatch, int3_dir, tmp_path / "resumed", teacher_dir, cfg)
    again = recover(str(int3_dir), str(tmp_path / "resumed"), str(teacher_dir), cfg, progress=False)
    assert again["resumed_at"] == 3
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert after.keys() == b.keys() and all(torch.equal(after[k], b[k]) for k in after)
    with pytest.raises(ValueError, match="lr_codes_end_to_end"):
        RecoverConfig(end_to_end_codes=True, lr_codes_end_to_end=0)
    with pytest.raises(ValueError, match="momentum_codes_end_to_end"):
        RecoverConfig(end_to_end_codes=True, momentum_codes_end_to_end=1.0)


def test_end_to_end_codes_after_block_codes_start_from_the_block_phase_codes(int3_dir, teacher_dir, tmp_path,
                                                                            text_file):
    """With both, the end-to-end phase starts from the block phase's codes: stored codes are at most two
    steps from the checkpoint's, at most one from the block phase's."""
    data, train = _small(text_file, steps=4)
    cfg = RecoverConfig(train=train, data=data, train_codes=True, lr_codes=0.03, blockwise_steps=40,
                        blockwise_windows=4, end_to_end_codes=True, lr_codes_end_to_end=0.3)
    out = tmp_path / "rec"
    summary = recover(str(int3_dir), str(out), str(teacher_dir), cfg, progress=False)
    c0, c1 = _codes(int3_dir), _codes(out)
    assert summary["blockwise"]["codes_changed"] > 0 and summary["codes_changed_end_to_end"] > 0
    assert max(int((c1[k] - c0[k]).abs().max()) for k in c0) <= 2


def test_signed_groups_stay_out_of_the_gradient_clip(tokenizer, text_file):
    """The trainer clips the Adam groups' gradient norm only: a huge gradient on a signed group (code
    offsets) leaves the scales' step as it is; the signed group moves by exactly its learning rate."""
    torch.manual_seed(0)
    model = build_tiny_llama(seed=1)
    windows = torch.randint(5, 200, (4, 16))
    a = model.model.layers[0].mlp.up_proj.weight
    b = model.model.layers[0].mlp.down_proj.weight
    a0, b0 = a.detach().clone(), b.detach().clone()
    cfg = TrainConfig(steps=1, grad_accum=1, optimizer="adamw", eval_every=0, warmup_steps=0, max_grad_norm=1.0)
    trainer = Trainer(model, [{"name": "a", "params": [a], "lr": 1e-3},
                              {"name": "b", "params": [b], "lr": 0.25, "sign": True}],
                      windows, None, KDLoss(alpha=0.0), cfg, progress=False)
    trainer.run()
    moved = (b.detach() - b0).abs()
    assert torch.all((moved == 0) | torch.isclose(moved, torch.tensor(0.25)))
    assert (moved > 0).float().mean() > 0.5
    assert not torch.equal(a.detach(), a0)
    # with momentum the sign is the running mean's: a first step moves like plain signed descent
    from llmquant.distill.trainable import SignDescent

    p = torch.nn.Parameter(torch.zeros(3))
    opt = SignDescent([p], lr=0.1, momentum=0.9)
    for g in ([1.0, -1.0, 0.0], [-0.5, -1.0, 0.0], [-0.5, -1.0, 0.0]):
        p.grad = torch.tensor(g)
        opt.step()
    # running means: 0.1 -> 0.04 -> -0.014 (sign flips on the third step); -0.1, -0.19, -0.271; 0
    assert torch.allclose(p.detach(), torch.tensor([-0.1, 0.3, 0.0]))
    with pytest.raises(ValueError, match="beside an Adam group"):
        Trainer(model, [{"name": "b", "params": [b], "lr": 0.1, "sign": True}], windows, None, KDLoss(alpha=0.0),
                cfg, progress=False)


def test_recover_refuses_bad_input_before_training(int3_dir, teacher_dir, tmp_path, text_file, tokenizer):
    data, train = _small(text_file)
    cfg = RecoverConfig(train=train, data=data)
    with pytest.raises(ValueError, match="not an llmquant checkpoint"):
        recover(str(teacher_dir), str(tmp_path / "o"), str(teacher_dir), cfg, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        recover(str(int3_dir), str(tmp_path / "exists"), str(teacher_dir), cfg, progress=False)
    other = build_tiny_llama(vocab_size=1000)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(TokenizerMismatch, match="1000 output logits"):
        recover(str(int3_dir), str(tmp_path / "o"), str(tmp_path / "other"), cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_recover_nan_writes_no_output(int3_dir, teacher_dir, tmp_path, text_file):
    data, train = _small(text_file, steps=40, max_grad_norm=1e30)
    with pytest.raises(TrainingDiverged):
        recover(str(int3_dir), str(tmp_path / "o"), str(teacher_dir), RecoverConfig(train=train, data=data, lr=1e4),
                progress=False)
    assert not (tmp_path / "o").exists()


def test_distill_trains_a_smaller_student_loadable_by_plain_transformers(teacher_dir, tmp_path, tokenizer, text_file):
    student = build_tiny_llama(seed=7, hidden=32, inter=64)
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data, train = _small(text_file, steps=4)
    out = tmp_path / "distilled"
    summary = distill(str(teacher_dir), str(tmp_path / "student"), str(out),
                      DistillConfig(train=train, data=data, lr=1e-2), progress=False)
    assert summary["heldout_last"]["kl"] < summary["heldout_first"]["kl"]
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(back.config, "quantization_config", None) is None
    assert back.config.hidden_size == 32


def test_cli_recover(int3_dir, teacher_dir, tmp_path, text_file, capsys):
    out = tmp_path / "cli"
    rc = main(["recover", str(int3_dir), str(out), "--teacher", str(teacher_dir), "--steps", "2", "--data",
               str(text_file), "--seqlen", "64", "--heldout", "2", "--top-k", "8", "--grad-accum", "1",
               "--optimizer", "adamw", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    assert "recover: 2/2 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 2
    rc = main(["recover", str(teacher_dir), str(tmp_path / "x"), "--teacher", str(teacher_dir)])
    assert rc == 2 and "not an llmquant checkpoint" in capsys.readouterr().err


def test_cli_distill_refuses_a_quantized_student_and_another_tokenizer(int3_dir, teacher_dir, tmp_path, capsys,
                                                                      text_file):
    rc = main(["distill", str(teacher_dir), str(int3_dir), str(tmp_path / "d"), "--data", str(text_file)])
    assert rc == 2 and "is quantized: distill trains float students" in capsys.readouterr().err
    other = build_tiny_llama(vocab_size=1000)
    other.save_pretrained(tmp_path / "other")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "other")
    rc = main(["distill", str(teacher_dir), str(tmp_path / "other"), str(tmp_path / "d"), "--data", str(text_file)])
    assert rc == 2 and "the student 1000: distillation needs the same tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def _block_linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("keep", [True, False])
def test_distill_keeps_a_pruned_students_zeros_exactly_unless_told_not_to(teacher_dir, tmp_path, text_file, keep):
    from transformers import AutoModelForCausalLM

    from llmquant.prune import SparsityConfig
    from llmquant.prune.jobs import prune

    pruned = tmp_path / "pruned"
    prune(str(teacher_dir), str(pruned), SparsityConfig(method="magnitude", sparsity=0.5), progress=False)
    before = _block_linears(AutoModelForCausalLM.from_pretrained(pruned))
    data, train = _small(text_file, steps=4)
    out = tmp_path / "distilled"
    summary = distill(str(teacher_dir), str(pruned), str(out),
                      DistillConfig(train=train, data=data, lr=1e-2, keep_sparsity=keep), progress=False)
    back = AutoModelForCausalLM.from_pretrained(out)
    after = _block_linears(back)
    assert before.keys() == after.keys() and before
    zero_before = {n: w == 0 for n, w in before.items()}
    assert all(z.float().mean() >= 0.5 for z in zero_before.values())
    changed = sum(int(((after[n] != before[n]) & ~z).sum()) for n, z in zero_before.items())
    assert changed > 0  # the kept weights trained
    refilled = sum(int((after[n][z] != 0).sum()) for n, z in zero_before.items())
    if keep:
        assert refilled == 0
        assert summary["sparsity_kept"]["layers"] == len(before)
        assert summary["sparsity_kept"]["sparsity"] == pytest.approx(
            sum(int(z.sum()) for z in zero_before.values()) / sum(z.numel() for z in zero_before.values()))
        assert back.config.sparsity_config["method"] == "magnitude"
    else:
        assert refilled > 0 and "sparsity_kept" not in summary
        assert getattr(back.config, "sparsity_config", None) is None  # no longer claims to be sparse


def test_pruned_masks_refuse_a_sparsity_config_of_another_model(tiny_llama):
    from llmquant.distill.recipes import pruned_masks

    assert pruned_masks(tiny_llama) == {}
    tiny_llama.config.sparsity_config = {"layers": {"model.layers.9.mlp.up_proj": 0.5}}
    with pytest.raises(ValueError, match="does not have"):
        pruned_masks(tiny_llama)
    tiny_llama.config.sparsity_config = {"layers": {"model.layers.0.input_layernorm": 0.5}}
    with pytest.raises(ValueError, match="not a float linear layer"):
        pruned_masks(tiny_llama)


def test_recovery_report_measures_the_full_kl_to_the_teacher(int3_dir, teacher_dir, tmp_path, text_file):
    """evals/recovery.py --kl: the whole-vocabulary KL of each model against the teacher on the evaluation
    tokens, beside perplexity; the teacher's own row is 0, and four steps of recovery lower it."""
    from llmquant.evals.recovery import main

    out = tmp_path / "results"
    main(["--teacher", str(teacher_dir), "--checkpoint", str(int3_dir), "--label", "tiny", "--recovered",
          str(tmp_path / "rec"), "--steps", "4", "--lr", "1e-2", "--grad-accum", "1", "--optimizer", "adamw",
          "--data", str(text_file), "--seqlen", "64", "--top-k", "16", "--corpus", str(text_file),
          "--context", "64", "--max-tokens", "1024", "--kl", "--out", str(out)])
    rows = json.loads((out / "recover_tiny.json").read_text())["rows"]
    kl = {r["run"]: r["kl_to_teacher"] for r in rows}
    assert kl["float"] == 0.0 and 0 < kl["recovered"] < kl["quantized"]
    assert all(0 <= r["top1_agreement"] <= 1 for r in rows)
    assert "KL(teacher ‖ model) over the whole vocabulary" in (out / "recover_tiny.md").read_text()
