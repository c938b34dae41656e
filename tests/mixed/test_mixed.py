"""Mixed precision: exact costs, the allocator against brute force, the measurement pass on tiny real
architectures, budgets end to end (quantize, save, load, info) and the errors bad budgets get."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

import llmquant
from llmquant.config import LayerQuant, QuantConfig, QuantConfigError
from llmquant.mixed import BudgetError, Measurement, MeasurementError, allocate, candidates, layer_bytes, scheme_key
from llmquant.mixed.cost import parse_scheme_key
from llmquant.mixed.measure import GroupMeasure, LayerMeasure, MEASUREMENT_VERSION
from llmquant.modules.quant_linear import QuantLinear
from llmquant.quantizers.rtn import quantize_weight_rtn
from tests.quantizers.tiny_models import tiny_calibration, tiny_model


@pytest.mark.parametrize("n,k", [(64, 64), (48, 200), (7, 33)])
def test_layer_bytes_are_the_stored_bytes(n, k):
    w = torch.randn(n, k)
    for s in candidates():
        q = QuantLinear.from_packed(quantize_weight_rtn(w, s), None)
        assert layer_bytes(n, k, s, perm=False) == q.weight_bytes(), scheme_key(s)
    # act-order adds one int32 per input column
    assert layer_bytes(n, k, LayerQuant(4, 32, True), perm=True) == layer_bytes(n, k, LayerQuant(4, 32, True), perm=False) + 4 * k
    for s in candidates():  # and so are compact ones
        q = QuantLinear.from_packed(quantize_weight_rtn(w, s, compact=True), None, compact=True)
        assert layer_bytes(n, k, s, perm=False, compact=True) == q.weight_bytes(), scheme_key(s)
    # whose perm is int16: act-order adds two bytes per input column
    s = LayerQuant(3, 32, False)
    pw = quantize_weight_rtn(w, s, compact=True)
    pw.perm = torch.randperm(k, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    q = QuantLinear.from_packed(pw, None, compact=True)
    assert q.perm.dtype == torch.int16 and torch.equal(q.packed().perm, pw.perm)
    assert layer_bytes(n, k, s, perm=True, compact=True) == q.weight_bytes()
    assert layer_bytes(n, k, s, perm=True, compact=True) == layer_bytes(n, k, s, perm=False, compact=True) + 2 * k


def test_scheme_keys_round_trip():
    for s in candidates():
        assert parse_scheme_key(scheme_key(s)) == s
    with pytest.raises(ValueError, match="not a scheme key"):
        parse_scheme_key("4bits")


# --- allocation -----------------------------------------------------------------------------------
def _synthetic(n_groups: int, keys: list[str], seed: int) -> Measurement:
    g = torch.Generator().manual_seed(seed)
    layers, groups = [], []
    for i in range(n_groups):
        n, k = int(torch.randint(8, 64, (1,), generator=g)) * 8, 64 * int(torch.randint(1, 4, (1,), generator=g))
        base = float(torch.rand(1, generator=g)) * 10 + 0.1
        errors = {}
        for key in keys:
            s = parse_scheme_key(key)
            errors[key] = base * 4.0 ** (-s.bits) * (1 + 0.1 * (s.group_size == -1)) * (0.9 if not s.sym else 1.0)
        layers.append(LayerMeasure(f"l{i}", n, k, errors, {key: layer_bytes(n, k, parse_scheme_key(key), False) for key in keys}, 1.0))
        groups.append(GroupMeasure(f"l{i}", [f"l{i}"], float(torch.rand(1, generator=g)) + 0.01, 0.0, 0.0))
    return Measurement(MEASUREMENT_VERSION, "x", {}, {}, keys, layers, groups, 0, {})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_matches_brute_force(seed):
    keys = ["2g128s", "3g128s", "4g64s", "4g128s", "8gchs"]
    meas = _synthetic(5, keys, seed)
    weights = sum(lay.n * lay.k for lay in meas.layers)
    for bpw in (2.5, 3.3, 4.2, 6.0):
        budget = int(bpw * weights / 8)
        for resolution in (300, 20000):
            a = allocate(meas, budget, keys, resolution=resolution)
            slack = len(meas.groups) * budget / resolution  # what rounding costs up to units may lose

            def optimum(b):
                return min(sum(meas.damage(g, c) for g, c in zip(meas.groups, combo))
                           for combo in itertools.product(keys, repeat=len(meas.groups))
                           if sum(meas.layer(g.layers[0]).bytes[c] for g, c in zip(meas.groups, combo)) <= b)

            assert a.bytes <= budget
            assert optimum(budget) * (1 - 1e-12) <= a.predicted_kl <= optimum(budget - slack) * (1 + 1e-12)
            assert a.lower_bound <= optimum(budget) * (1 + 1e-9)


def test_allocation_with_fixed_group_and_bad_budgets():
    keys = ["2g128s", "4g128s", "8g128s"]
    meas = _synthetic(4, keys, 3)
    weights = sum(lay.n * lay.k for lay in meas.layers)
    a = allocate(meas, int(4.2 * weights / 8), keys, fixed={"l0": "8g128s"})
    assert a.choice["l0"] == "8g128s"
    with pytest.raises(BudgetError, match=r"below the smallest allocation.*2\.\d+ bpw"):
        allocate(meas, int(1.5 * weights / 8), keys)
    with pytest.raises(BudgetError, match=r"above the largest allocation.*8\.\d+ bpw"):
        allocate(meas, int(9 * weights / 8), keys)


# --- measurement on real (tiny) architectures -----------------------------------------------------
@pytest.fixture(scope="module")
def llama_measurement():
    from llmquant.mixed.measure import measure

    model = tiny_model("llama")
    cfg = QuantConfig(method="gptq", target_bpw=3.5, mixed_bits=(2, 3, 4, 8), mixed_group_sizes=(32, 64))
    schemes = candidates(cfg.mixed_bits, cfg.mixed_group_sizes)
    return model, cfg, measure(model, cfg, tiny_calibration(), schemes, progress=False)


def test_measurement_groups_errors_and_costs(llama_measurement):
    model, cfg, meas = llama_measurement
    groups = {g.name: g.layers for g in meas.groups}
    # layers that read one tensor are one group: vLLM serves them as one fused layer
    assert groups["model.layers.0.self_attn.q_proj"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert groups["model.layers.0.mlp.gate_proj"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert len(meas.groups) == 8 and len(meas.layers) == 14
    for lay in meas.layers:
        e = lay.errors
        for g in (32, 64):
            chain = [e[f"{b}g{g}s"] for b in (8, 4, 3, 2)]
            assert all(x < y for x, y in zip(chain, chain[1:])), (lay.name, chain)
        assert 0 < e["8g32s"] < 1e-3 * lay.energy
        assert lay.bytes["4g32s"] == layer_bytes(lay.n, lay.k, LayerQuant(4, 32, True), perm=True)
    for g in meas.groups:
        assert g.sensitivity > 0 and g.probe_kl > 0
        assert g.sensitivity * g.probe_error == pytest.approx(g.probe_kl)


def test_measurement_file_round_trip_and_checks(llama_measurement, tmp_path):
    model, cfg, meas = llama_measurement
    keys = [scheme_key(s) for s in candidates(cfg.mixed_bits, cfg.mixed_group_sizes)]
    path = meas.save(tmp_path / "m.json")
    back = Measurement.load(path)
    assert back == meas
    back.check(model, cfg, keys)
    with pytest.raises(MeasurementError, match="another model.*fingerprint"):
        back.check(tiny_model("llama", seed=5), cfg, keys)
    with pytest.raises(MeasurementError, match="another model.*14 layers.*8 planned layers"):
        back.check(tiny_model("gpt2"), cfg, keys)
    with pytest.raises(MeasurementError, match="made with"):
        back.check(model, cfg.replace(act_order=False), keys)
    with pytest.raises(MeasurementError, match="made with.*compact_qparams"):  # it priced float16 scales
        back.check(model, cfg.replace(compact_qparams=True), keys)
    with pytest.raises(MeasurementError, match="also asks for"):
        back.check(model, cfg, keys + ["4g128s"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MeasurementError, match="cannot read"):
        Measurement.load(tmp_path / "bad.json")


def test_gptq_error_estimates_use_each_grids_own_ratio():
    """The reference schemes (3 and 4 bits, symmetric, group 128 and per channel) are predicted as GPTQ's
    own error on them; the other schemes scale round-to-nearest by the ratio of their own kind of grid."""
    from llmquant.mixed.measure import _gptq_weight, _output_error, _rtn_weight, ESTIMATE_CLIP_STEP, layer_errors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.2, 3, 256)
    h = 2 * x.t() @ x / 512
    cfg = QuantConfig(method="gptq", bits=4, group_size=128)
    schemes = [LayerQuant(b, gs, sym) for b in (2, 3, 4) for gs in (64, 128, -1) for sym in (True, False)]
    est = layer_errors("l", w, h, 512, schemes, cfg)
    imp = torch.diagonal(h).clone()

    def gptq(s):
        return _output_error(w - _gptq_weight(w.clone(), h, 512, s, cfg, "l"), h)

    def rtn(s):
        return _output_error(w - _rtn_weight(w, s, cfg.clip_search, imp, ESTIMATE_CLIP_STEP), h)

    for bits in (3, 4):
        for gs in (128, -1):
            ref = LayerQuant(bits, gs, True)
            assert est[scheme_key(ref)] == pytest.approx(gptq(ref), rel=1e-6)
    ratio_ch3 = gptq(LayerQuant(3, -1, True)) / rtn(LayerQuant(3, -1, True))
    ratio_g3 = gptq(LayerQuant(3, 128, True)) / rtn(LayerQuant(3, 128, True))
    assert est["3gcha"] == pytest.approx(rtn(LayerQuant(3, -1, False)) * ratio_ch3, rel=1e-6)
    assert est["2gchs"] == pytest.approx(rtn(LayerQuant(2, -1, True)) * ratio_ch3, rel=1e-6)  # 2 bits: 3's ratio
    assert est["3g64s"] == pytest.approx(rtn(LayerQuant(3, 64, True)) * ratio_g3, rel=1e-6)
    # without per-channel candidates no per-channel GPTQ runs, and grouped schemes keep the grouped ratio
    grouped = [s for s in schemes if s.group_size != -1]
    est2 = layer_errors("l", w, h, 512, grouped, cfg)
    assert all(est2[k] == pytest.approx(est[k], rel=1e-6) for k in est2)


def test_predicted_damage_tracks_the_real_kl():
    """The per-group calibration predicts the KL of another scheme than the probe's (within 3x on
    this model), and ranks groups as the real effect does."""
    from llmquant.mixed.measure import _rtn_weight, _set_weight, measure

    model = tiny_model("llama")
    cfg = QuantConfig(method="rtn", target_bpw=3.5, mixed_bits=(3, 4), mixed_group_sizes=(32,))
    meas = measure(model, cfg, tiny_calibration(), candidates(cfg.mixed_bits, cfg.mixed_group_sizes), progress=False)
    calib = torch.cat(tiny_calibration()[:2])
    with torch.no_grad():
        ref = torch.log_softmax(model(calib).logits.float(), -1)
    mods = dict(model.named_modules())
    pred, real = [], []
    for g in meas.groups:
        saved = {n: mods[n].weight.data.clone() for n in g.layers}
        for n in g.layers:
            _set_weight(mods[n], _rtn_weight(mods[n].weight.data.float(), LayerQuant(3, 32, True), False, None))
        with torch.no_grad():
            logq = torch.log_softmax(model(calib).logits.float(), -1)
        for n in g.layers:
            mods[n].weight.data = saved[n]
        real.append(float((ref.exp() * (ref - logq)).sum(-1).mean()))
        pred.append(meas.damage(g, "3g32s"))
    ratio = torch.tensor(pred) / torch.tensor(real)
    assert ((ratio > 0.33) & (ratio < 3)).all(), ratio
    rank = lambda xs: torch.tensor(xs).argsort().argsort().float()  # noqa: E731
    r = torch.corrcoef(torch.stack([rank(pred), rank(real)]))[0, 1]
    assert r > 0.6, (pred, real)


# --- budgets end to end ---------------------------------------------------------------------------
def _bpw(model) -> float:
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return 8 * sum(m.weight_bytes() for m in qs) / sum(m.in_features * m.out_features for m in qs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_target_bpw_end_to_end(family, tmp_path):
    model = tiny_model(family)
    x = tiny_calibration(1)[0]
    cfg = QuantConfig(method="gptq", target_bpw=3.25)
    summary = llmquant.quantize(model, cfg, calibration=tiny_calibration(), progress=False,
                                measurement=tmp_path / "m.json")
    bpw = _bpw(model)
    assert 3.1 < bpw <= 3.25 and bpw == pytest.approx(summary["mixed"]["allocation"]["bpw"])
    stored = QuantConfig.from_dict(summary["quantization_config"])
    assert not stored.budgeted and stored.mixed["target_bpw"] == 3.25
    # every quantized layer's scheme is named, and fused layers share theirs
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            s = stored.resolve(name)
            assert (m.bits, m.group_size, m.sym) == (s.bits, s.group_size, s.sym)
    if family != "gpt2":
        qkv = {(lambda s: (s.bits, s.group_size, s.sym))(stored.resolve(f"model.layers.1.self_attn.{p}_proj")) for p in "qkv"}
        assert len(qkv) == 1
    with torch.no_grad():
        y = model(x).logits
    llmquant.save_quantized(model, tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, y)
    # a second budget reuses the measurement file (no calibration pass needed)
    model2 = tiny_model(family)
    s2 = llmquant.quantize(model2, cfg.replace(target_bpw=4.5), calibration=tiny_calibration(), progress=False,
                           measurement=tmp_path / "m.json")
    assert s2["mixed"]["seconds"]["measure"] < 1.0 and 4.3 < _bpw(model2) <= 4.5


def test_target_bpw_with_compact_qparams_spends_the_saved_bytes(tmp_path):
    """Compact scales and zero points are priced as stored: the budget holds on the checkpoint's real
    bytes, and the bytes they save buy wider schemes than the same budget with float16 scales."""
    budget = 3.25
    out = {}
    for compact in (False, True):
        model = tiny_model("llama")
        cfg = QuantConfig(method="gptq", target_bpw=budget, compact_qparams=compact)
        summary = llmquant.quantize(model, cfg, calibration=tiny_calibration(), progress=False)
        assert _bpw(model) <= budget and _bpw(model) == pytest.approx(summary["mixed"]["allocation"]["bpw"])
        out[compact] = summary["mixed"]["allocation"]["predicted_kl"]
        if compact:
            assert all(m.compact for m in model.modules() if isinstance(m, QuantLinear))
            llmquant.save_quantized(model, tmp_path / "ckpt")
            from transformers import AutoModelForCausalLM

            x = tiny_calibration(1)[0]
            back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
            with torch.no_grad():
                torch.testing.assert_close(back(x).logits, model(x).logits)
    assert out[True] < out[False]


def test_a_measurement_file_is_repriced_at_the_stored_bytes(tmp_path):
    """A measurement file priced with another format's bytes (a compact one written before the int16 perm
    priced an int32 perm) is repriced when reused: the budget and the reported bpw hold on the bytes stored."""
    cfg = QuantConfig(method="gptq", target_bpw=3.25, compact_qparams=True)
    path = tmp_path / "m.json"
    llmquant.quantize(tiny_model("llama"), cfg, calibration=tiny_calibration(), progress=False, measurement=path)
    d = json.loads(path.read_text())
    for lay in d["layers"]:
        lay["bytes"] = {key: b + 2 * lay["k"] for key, b in lay["bytes"].items()}
    path.write_text(json.dumps(d))
    meas = Measurement.load(path)
    assert meas.reprice(tiny_model("llama"), cfg) == len(meas.layers) and meas.reprice(tiny_model("llama"), cfg) == 0
    model = tiny_model("llama")
    summary = llmquant.quantize(model, cfg, calibration=tiny_calibration(), progress=False, measurement=path)
    assert _bpw(model) <= 3.25 and _bpw(model) == pytest.approx(summary["mixed"]["allocation"]["bpw"])


def test_max_size_bounds_the_checkpoint(tmp_path):
    from llmquant.checkpoint import checkpoint_headers

    model = tiny_model("llama")
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    budget = int(0.45 * float_bytes)
    llmquant.quantize(model, QuantConfig(method="gptq", max_size=budget), calibration=tiny_calibration(), progress=False)
    llmquant.save_quantized(model, tmp_path / "ckpt")
    header = checkpoint_headers(sorted((tmp_path / "ckpt").glob("*.safetensors")))
    tensor_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    assert 0.9 * budget < tensor_bytes <= budget
    with pytest.raises(BudgetError, match="leaves nothing for the quantized layers"):
        llmquant.quantize(tiny_model("llama"), QuantConfig(method="gptq", max_size=1000), calibration=tiny_calibration(),
                          progress=False)


def test_bad_budgets_are_refused_before_anything_changes():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match=r"below the smallest allocation.*bpw"):
        llmquant.quantize(model, QuantConfig(method="gptq", target_bpw=1.0), calibration=tiny_calibration(), progress=False)
    with pytest.raises(BudgetError, match=r"above the largest allocation.*bpw"):
        llmquant.quantize(model, QuantConfig(method="gptq", target_bpw=12.0), calibration=tiny_calibration(), progress=False)
    with pytest.raises(ValueError, match="calibration"):
        llmquant.quantize(model, QuantConfig(method="rtn", target_bpw=4.0))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(target_bpw=3.0, max_size=10), "one budget"),
    (dict(target_bpw=-1.0), "target_bpw"),
    (dict(target_bpw="3"), "target_bpw"),
    (dict(max_size=0), "max_size"),
    (dict(mixed_bits=(4, 5)), r"mixed_bits \[5\]"),
    (dict(mixed_group_sizes=()), "non-empty"),
])
def test_invalid_budget_configs(kwargs, msg):
    with pytest.raises(QuantConfigError, match=msg):
        QuantConfig(method="gptq", **kwargs)


def test_user_override_is_kept_and_counted():
    model = tiny_model("llama")
    cfg = QuantConfig(method="rtn", target_bpw=4.0, overrides={"*.down_proj": {"bits": 8, "group_size": 32}})
    s = llmquant.quantize(model, cfg, calibration=tiny_calibration(), progress=False)
    down = [m for n, m in model.named_modules() if n.endswith("down_proj")]
    assert all(m.bits == 8 and m.group_size == 32 for m in down)
    assert _bpw(model) <= 4.0 and s["mixed"]["allocation"]["bpw"] == pytest.approx(_bpw(model))


def test_cli_target_bpw_and_info(float_ckpt, tmp_path, capsys):
    from llmquant.cli.main import main

    out = tmp_path / "mixed"
    assert main(["quantize", str(float_ckpt), str(out), "--method", "gptq", "--target-bpw", "3.5",
                 "--nsamples", "8", "--seqlen", "64", "--measurement", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "mixed precision: 3." in text and "bit map" in text
    assert json.loads((tmp_path / "m.json").read_text())["version"] == MEASUREMENT_VERSION
    assert main(["info", str(out), "--plot", str(tmp_path / "bits.png")]) == 0
    text = capsys.readouterr().out
    bpw = float(text.split("bits per quantized weight (codes, scales, zeros, perm, rotation signs): ")[1].split()[0])
    assert 3.3 < bpw <= 3.5 and "mixed precision: target 3.5 bpw" in text
    assert (tmp_path / "bits.png").stat().st_size > 1000
    assert main(["quantize", str(float_ckpt), str(tmp_path / "x"), "--method", "gptq", "--target-bpw", "0.5",
                 "--nsamples", "8", "--seqlen", "64"]) == 2
    assert "below the smallest allocation" in capsys.readouterr().err


def test_quantize_on_load_with_a_budget(float_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    qc = llmquant.LlmQuantConfig(method="rtn", target_bpw=3.0, nsamples=8, seqlen=64)
    model = AutoModelForCausalLM.from_pretrained(float_ckpt, quantization_config=qc)
    assert 2.8 < _bpw(model) <= 3.0
    stored = model.config.quantization_config
    stored = stored.to_dict() if hasattr(stored, "to_dict") else stored
    assert stored["mixed"]["target_bpw"] == 3.0 and "target_bpw" not in stored
    model.save_pretrained(tmp_path / "ckpt")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert _bpw(back) == _bpw(model)


# --- latency budgets ------------------------------------------------------------------------------
def test_latency_budget_from_a_timing_table(tmp_path):
    from llmquant.mixed.latency import LatencyError, load_table, measure_table, save_table, shape_key

    model = tiny_model("llama")
    cfg = QuantConfig(method="gptq", mixed_bits=(2, 4, 8), mixed_group_sizes=(32,))
    schemes = candidates(cfg.mixed_bits, cfg.mixed_group_sizes)
    shapes = {(m.weight.shape[0], m.weight.shape[1]) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    table = measure_table(shapes, schemes, perm=True, reps=5, progress=False)
    assert set(table["entries"]) == {shape_key(n, k) for n, k in shapes}
    assert all(v > 0 for e in table["entries"].values() for v in e.values())
    path = save_table(table, tmp_path / "t.json")
    # the real table ranks close schemes by noise on a tiny layer; a table with costs that differ
    # (8-bit slow) makes the budget bind, and the allocation must respect the predicted time
    for e in table["entries"].values():
        e.update({"2g32s": 10.0, "2g32a": 11.0, "4g32s": 20.0, "4g32a": 21.0, "8g32s": 40.0, "8g32a": 41.0})
    save_table(table, tmp_path / "t2.json")
    layers = 14
    budget_ms = layers * 25.0 / 1000
    s = llmquant.quantize(model, cfg.replace(max_latency=budget_ms), calibration=tiny_calibration(), progress=False,
                          timing_table=tmp_path / "t2.json")
    a = s["mixed"]["allocation"]
    assert a["unit"] == "us" and a["predicted_ms"] <= budget_ms and a["predicted_ms"] > 0.8 * budget_ms
    assert QuantConfig.from_dict(s["quantization_config"]).mixed["max_latency"] == budget_ms
    from llmquant.cli.commands import checkpoint_info, format_info

    llmquant.save_quantized(model, tmp_path / "lat")
    assert f"mixed precision: max_latency {budget_ms} ms" in format_info(checkpoint_info(tmp_path / "lat"))
    with pytest.raises(LatencyError, match="needs a timing table"):
        llmquant.quantize(tiny_model("llama"), cfg.replace(max_latency=1.0), calibration=tiny_calibration(),
                          progress=False)
    other = load_table(path)
    other["machine"]["cpu"] = "Some Other CPU"
    save_table(other, tmp_path / "other.json")
    with pytest.raises(LatencyError, match="another machine.*Some Other CPU"):
        llmquant.quantize(tiny_model("llama"), cfg.replace(max_latency=1.0), calibration=tiny_calibration(),
                          progress=False, timing_table=tmp_path / "other.json")
    with pytest.raises(BudgetError, match=r"below the smallest allocation.*ms"):
        llmquant.quantize(tiny_model("llama"), cfg.replace(max_latency=0.001), calibration=tiny_calibration(),
                          progress=False, timing_table=tmp_path / "t2.json")


def test_cli_timing_and_max_latency(float_ckpt, tmp_path, capsys):
    from llmquant.cli.main import main
    from llmquant.mixed.latency import load_table

    t = tmp_path / "t.json"
    assert main(["timing", str(float_ckpt), str(t), "--bits", "4", "8", "--group-sizes", "32", "--reps", "3"]) == 0
    table = load_table(t)
    total_fast = sum(min(e.values()) for e in table["entries"].values())
    assert main(["quantize", str(float_ckpt), str(tmp_path / "q"), "--method", "gptq", "--mixed-bits", "4", "8",
                 "--mixed-group-sizes", "32", "--max-latency", "1000", "--timing-table", str(t),
                 "--nsamples", "8", "--seqlen", "64"]) == 2  # above what every layer at 8 bits takes
    assert "above the largest allocation" in capsys.readouterr().err
    assert main(["quantize", str(float_ckpt), str(tmp_path / "q"), "--method", "gptq", "--mixed-bits", "4", "8",
                 "--mixed-group-sizes", "32", "--max-latency", "0.000001", "--nsamples", "8", "--seqlen", "64"]) == 2
    assert "needs a timing table" in capsys.readouterr().err
    assert total_fast > 0
