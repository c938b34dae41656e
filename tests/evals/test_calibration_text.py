import argparse
import json

import pytest

from llmquant.evals import calibration_text as ct


def _row(run, text, ppl, sha, **extra):
    proto = {"corpus_sha256": sha, "max_tokens": 8192, "context": 512, "stride": 512, "bos": True}
    return dict(model=f"{run} on {text}", protocol=proto, ppl=ppl, run=run, text=text, **extra)


def _args(**kw):
    d = dict(model="m", bits=3, group_size=128, rotation="hadamard", float_targets=True, compact_qparams=True,
             tag="t", calibration="builtin")
    d.update(kw)
    return argparse.Namespace(**d)


def test_report_names_each_text_and_each_calibration(tmp_path):
    cal = {"source": "wiki", "nsamples": 128, "seqlen": 512, "seed": 0}
    rows = [_row("float", "wikitext2", 20.0, "aa"), _row("float", "pydoc", 10.0, "bb"),
            _row("gptq int3 g128, calibrated on wiki", "wikitext2", 25.0, "aa", calibration=cal, quantize_seconds=400.0),
            _row("gptq int3 g128, calibrated on wiki", "pydoc", 15.0, "bb", calibration=cal, quantize_seconds=400.0)]
    result = ct._summarize(_args(), rows)
    ct.write(result, tmp_path, quiet=True)
    md = (tmp_path / "calibration_text_m-t.md").read_text()
    # increases are per text, each against the float model on the same text
    assert "| gptq int3 g128, calibrated on wiki | 25.00 | 25.0 | 15.00 | 50.0 | 400 |" in md
    assert "sha256 aa" in md and "sha256 bb" in md
    assert "rotation hadamard, options: float_targets, compact_qparams" in md
    saved = json.loads((tmp_path / "calibration_text_m-t.json").read_text())
    assert [r["ppl_increase_pct"] for r in saved["rows"]] == pytest.approx([0, 0, 25, 50])
    assert (tmp_path / "calibration_text_m-t.png").stat().st_size > 0


def test_single_calibration_flag_is_refused():
    with pytest.raises(SystemExit, match="--calibrations"):
        ct.run(_args(calibration="wiki", corpus=None, calibrations=["builtin"]))
