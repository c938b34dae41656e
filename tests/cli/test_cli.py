"""The CLI end to end on a tiny float checkpoint (a real tokenizer, random weights)."""
import json

import pytest

from llmquant.cli.main import main


def test_quantize_info_eval_export(float_ckpt, tmp_path, capsys):
    q = tmp_path / "q4"
    assert main(["quantize", str(float_ckpt), str(q), "--bits", "4", "--group-size", "32",
                 "--override", "down_proj=bits:8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "quantized linear layers: 14" in out

    assert main(["info", str(q), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    bits = {lay["name"]: lay["bits"] for lay in info["layers"]}
    assert bits["model.layers.0.mlp.down_proj"] == 8 and bits["model.layers.0.self_attn.q_proj"] == 4
    # which kernel (and instruction set) runs each layer on this machine
    from llmquant.kernels import cpu_native

    assert main(["info", str(q), "--kernels", "--json", str(tmp_path / "k.json")]) == 0
    kern = {lay["name"]: lay["kernel"] for lay in json.loads((tmp_path / "k.json").read_text())["layers"]}
    native = cpu_native.load()[0]
    want = f"cpu ({native.isa})" if native else "reference"
    assert set(kern.values()) == {want}, kern
    assert want in capsys.readouterr().out

    res = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(float_ckpt), str(q), "--context", "64", "--max-tokens", "192",
                 "--json", str(res)]) == 0
    rows = json.loads(res.read_text())
    assert [r["tokens_scored"] for r in rows] == [189, 189]  # no BOS for a non-Gemma model: 3 windows x 63
    assert "protocol: wiki.test.raw" in capsys.readouterr().out

    assert main(["eval", "compare", str(float_ckpt), str(q), "--context", "64", "--max-tokens", "128",
                 "--json", str(tmp_path / "cmp.json")]) == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert 0 < cmp["kl_mean"] < 1 and 0 < cmp["top1_agreement"] <= 1

    g = tmp_path / "q4-g32-gptq-layout"
    q2 = tmp_path / "q4-uniform"
    assert main(["quantize", str(float_ckpt), str(q2), "--bits", "4", "--group-size", "32"]) == 0
    assert main(["export-gptq", str(q2), str(g)]) == 0
    assert json.loads((g / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_user_errors_are_one_line(float_ckpt, tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "f").write_text("keep")
    assert main(["quantize", str(float_ckpt), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["info", str(float_ckpt)]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(float_ckpt), str(tmp_path / "y"), "--override", "nonsense"])


def test_quantize_embedding_from_the_cli(float_ckpt, tmp_path, capsys):
    """--quantize-embedding with --quantize-lm-head on a tied model: one shared table, named by info."""
    q = tmp_path / "qe"
    assert main(["quantize", str(float_ckpt), str(q), "--bits", "4", "--group-size", "32", "--quantize-lm-head",
                 "--quantize-embedding"]) == 0
    out = capsys.readouterr().out
    assert "quantized layers (the embedding table among them): 15" in out
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"]["quantize_embedding"] is True and cfg["tie_word_embeddings"] is True
    assert main(["info", str(q), "--kernels", "--json", str(tmp_path / "k.json")]) == 0
    kern = {lay["name"]: lay["kernel"] for lay in json.loads((tmp_path / "k.json").read_text())["layers"]}
    assert kern["model.embed_tokens"].startswith(("cpu", "reference"))  # it serves the tied head too


def test_float_targets_flag_reaches_the_config(capsys):
    from llmquant.cli.commands import config_from_args
    from llmquant.cli.main import build_parser

    def config(*flags):
        return config_from_args(build_parser().parse_args(["quantize", "m", "out", *flags]))

    assert config("--method", "gptq", "--float-targets").float_targets is True
    assert config("--method", "gptq").float_targets is False
    assert main(["quantize", "m", "out", "--float-targets"]) == 2  # rtn has none: one-line error, nothing loaded
    assert "does not use float_targets" in capsys.readouterr().err


def test_compact_qparams_from_the_command_line(float_ckpt, tmp_path, capsys):
    """--compact-qparams stores fewer bytes for the same codes, and info says so."""
    bpw = {}
    for flag in ("--no-compact-qparams", "--compact-qparams"):
        out = tmp_path / flag
        assert main(["quantize", str(float_ckpt), str(out), "--bits", "3", "--group-size", "32", "--asym", flag]) == 0
        capsys.readouterr()
        assert main(["info", str(out), "--json", str(tmp_path / "i.json")]) == 0
        bpw[flag] = json.loads((tmp_path / "i.json").read_text())["bpw"]
        said = capsys.readouterr().out
        assert ("scales and zero points: compact" in said) == (flag == "--compact-qparams")
    # per 32 weights: 16 + 8 bits of scale and zero point, or 8 + 3 (less the padding of each row's zero points
    # to whole bytes; the codes' bits are the same)
    assert 0.3 < bpw["--no-compact-qparams"] - bpw["--compact-qparams"] <= 13 / 32
