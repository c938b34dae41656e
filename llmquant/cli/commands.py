"""Sub-commands of the ``llmquant`` CLI: each ``add_*`` declares one, each ``run_*`` carries it out."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_CONTEXT = 512
DEMO_MAX_TOKENS = 8192


# --- quantize -------------------------------------------------------------------------------------
def _parse_override(text: str) -> tuple[str, object]:
    """``PATTERN=bits:3,group_size:64,sym:false`` or ``PATTERN=skip``."""
    pattern, sep, spec = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"override {text!r}: expected PATTERN=bits:N[,group_size:G][,sym:B] or PATTERN=skip")
    if spec == "skip":
        return pattern, "skip"
    out: dict[str, object] = {}
    for item in spec.split(","):
        key, _, val = item.partition(":")
        if key in ("bits", "group_size"):
            try:
                out[key] = int(val)
            except ValueError:
                raise argparse.ArgumentTypeError(f"override {text!r}: {key} must be an integer") from None
        elif key == "sym":
            if val.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"override {text!r}: sym must be true or false")
            out[key] = val.lower() == "true"
        else:
            raise argparse.ArgumentTypeError(f"override {text!r}: unknown field {key!r}")
    return pattern, out


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``150MB`` / ``140MiB`` / ``1.2GB`` / ``123456`` -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number with an optional unit {sorted(_SIZE_UNITS)[1:]}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def add_scheme_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization scheme")
    g.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    g.add_argument("--group-size", type=int, default=128, choices=(-1, 32, 64, 128), help="-1: per channel")
    g.add_argument("--asym", action="store_true", help="asymmetric (zero point per group); default symmetric")
    from llmquant.registry import get_method, method_names

    g.add_argument("--method", default="rtn", choices=method_names(),
                   help="; ".join(f"{m}: {get_method(m).description}" for m in method_names()))
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by decreasing Hessian diagonal (default: on for gptq)")
    g.add_argument("--static-groups", action="store_true", help="GPTQ act-order with groups fixed up front")
    g.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="search each group's clipping range (GPTQ: Hessian-weighted error) instead of min/max "
                        "(default: on for gptq, off for rtn)")
    g.add_argument("--float-targets", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: each layer aims at the float model's outputs on the calibration text, making up for "
                        "the error of the layers quantized before it (default: the method's)")
    g.add_argument("--compact-qparams", action=argparse.BooleanOptionalAction, default=None,
                   help="store scales as 8-bit codes of a log grid and zero points in the codes' width (gptq, rtn): "
                        "about 0.1 bit a weight less at group size 128")
    g.add_argument("--rotate", choices=("hadamard",), default=None, dest="rotation",
                   help="rotate each layer's input by a randomized 128-column Hadamard transform before quantizing "
                        "(gptq, rtn): fewer outliers per group, much lower error at 3 and 2 bits; stored with the "
                        "checkpoint, not supported by the vLLM plugin or the GPTQ/compressed-tensors exports yet")
    g.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="module pattern to keep in float (repeatable; default: lm_head)")
    g.add_argument("--override", action="append", type=_parse_override, default=[], metavar="PATTERN=SPEC",
                   help="per-module scheme, e.g. 'mlp.down_proj=bits:8' or 're:.*layers\\.0\\..*=skip'")
    g.add_argument("--quantize-lm-head", action="store_true", help="quantize the output layer too")
    g.add_argument("--quantize-embedding", action="store_true",
                   help="quantize the input embedding table too (round to nearest; override its scheme with e.g. "
                        "'embed_tokens=bits:8'); with --quantize-lm-head and the same scheme a tied head shares it (a head tied "
                        "to the embedding must be quantized too: a float one would keep a second, float table)")
    g.add_argument("--activations", default="float", choices=("float", "dynamic_int8"),
                   help="run-time activations stored as the checkpoint's default: dynamic_int8 quantizes each row "
                        "of x to int8 on the fly on the CPU kernel (LLMQUANT_ACTIVATIONS overrides it)")
    m = p.add_argument_group("mixed precision: each layer's scheme chosen under a budget (llmquant.mixed)")
    b = m.add_mutually_exclusive_group()
    b.add_argument("--target-bpw", type=float, metavar="BITS",
                   help="average bits per quantized weight, scales/zeros/perm included (e.g. 3.5)")
    b.add_argument("--max-size", type=parse_size, metavar="SIZE",
                   help="bytes of the whole checkpoint: 150MB, 140MiB, 1.2GB or a number of bytes")
    b.add_argument("--max-latency", type=float, metavar="MS",
                   help="milliseconds the quantized layers may take per decoded token, predicted from --timing-table")
    m.add_argument("--timing-table", metavar="FILE.json",
                   help="per-(shape, scheme) layer times measured on this machine by 'llmquant timing'")
    m.add_argument("--measurement", metavar="FILE.json",
                   help="keep the per-layer measurement here and reuse it for the next budget (read if it exists)")
    m.add_argument("--mixed-bits", type=int, nargs="+", default=[2, 3, 4, 8], metavar="B",
                   help="bit widths the allocation may choose (default: 2 3 4 8)")
    m.add_argument("--mixed-group-sizes", type=int, nargs="+", default=[-1, 32, 64, 128], metavar="G",
                   help="group sizes it may choose (default: -1 32 64 128)")
    c = p.add_argument_group("calibration (GPTQ, mixed precision)")
    c.add_argument("--calibration", default="builtin", help="'builtin' (= 'news', a news corpus), 'pydoc', a text file, or hf:<dataset>")
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace):
    from llmquant.config import QuantConfig

    return QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=not args.asym,
        method=args.method,
        act_order=args.act_order,
        static_groups=args.static_groups,
        clip_search=args.clip_search,
        float_targets=getattr(args, "float_targets", None),
        compact_qparams=getattr(args, "compact_qparams", None),
        skip=tuple(args.skip) if args.skip is not None else ("lm_head",),
        overrides=dict(args.override),
        quantize_lm_head=args.quantize_lm_head,
        quantize_embedding=args.quantize_embedding,
        activations=args.activations,
        rotation=getattr(args, "rotation", None),
        target_bpw=args.target_bpw,
        max_size=args.max_size,
        max_latency=args.max_latency,
        mixed_bits=tuple(args.mixed_bits),
        mixed_group_sizes=tuple(args.mixed_group_sizes),
    )


def quantize_model(args: argparse.Namespace, model, tokenizer) -> dict:
    import llmquant

    from llmquant.registry import get_method

    config = config_from_args(args)
    calibration = None
    if get_method(config.method).needs_calibration or config.budgeted:
        from llmquant.calibration import calibration_batches
        from llmquant.models import bos_for_raw_text

        # calibration text is raw text: start it the way the model sees raw text (BOS for Gemma)
        calibration = calibration_batches(
            tokenizer, source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
            bos=bos_for_raw_text(args.model, tokenizer),
        )
    return llmquant.quantize(model, config, calibration=calibration, measurement=args.measurement,
                             timing_table=args.timing_table)


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    p.add_argument("model", help="built-in name (gemma3-270m, smollm2-135m), folder or hub id")
    p.add_argument("out", help="output checkpoint folder")
    add_scheme_args(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    import llmquant
    from llmquant.models import load_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    config_from_args(args)  # validate before the slow load
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    summary = quantize_model(args, model, tokenizer)
    llmquant.save_quantized(model, out, tokenizer, overwrite=args.overwrite)
    info = checkpoint_info(out)
    print(format_info(info))
    if "mixed" in summary:
        a, sec = summary["mixed"]["allocation"], summary["mixed"]["seconds"]
        ms = f", predicted {a['predicted_ms']:.3f} ms/token in the quantized layers" if "predicted_ms" in a else ""
        print(f"\nmixed precision: {a['bpw']:.3f} bpw ({a['bytes']} bytes){ms}, layers by "
              f"bits {a['layers_by_bits']}; predicted KL {a['predicted_kl']:.4g} nats/token (lower bound "
              f"{a['lower_bound_kl']:.4g}); measure {sec['measure']:.1f} s, allocate {sec['allocate']:.2f} s")
    print(f"\nquantized {summary['layers']} layers with {summary['method']} in {summary['seconds']:.1f} s "
          f"(total {time.perf_counter() - t0:.1f} s); saved to {out}")
    return 0


# --- eval -----------------------------------------------------------------------------------------
def _add_protocol_args(p: argparse.ArgumentParser, default_max_tokens: int | None) -> None:
    p.add_argument("--corpus", help="WikiText-2 raw test file (default: $LLMQUANT_WIKITEXT2 or ../shared/data)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="default: = context (non-overlapping)")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true", default=None, help="prepend BOS to each window")
    bos.add_argument("--no-bos", dest="bos", action="store_false", help="never prepend BOS")
    p.add_argument("--max-tokens", type=int, default=default_max_tokens, help="score only the first N corpus tokens")
    p.add_argument("--json", help="write the result here")


def _bos(args, name: str, tokenizer) -> bool:
    from llmquant.models import bos_for_raw_text

    return bos_for_raw_text(name, tokenizer) if args.bos is None else args.bos


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and KL divergence on WikiText-2")
    esub = p.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("ppl", help="perplexity of one or more models")
    pp.add_argument("models", nargs="+")
    _add_protocol_args(pp, None)
    pp.set_defaults(func=run_eval_ppl)
    pc = esub.add_parser("compare", help="KL divergence and top-1 agreement of QUANT against BASE")
    pc.add_argument("base")
    pc.add_argument("quant")
    _add_protocol_args(pc, 16384)
    pc.set_defaults(func=run_eval_compare)


def run_eval_ppl(args: argparse.Namespace) -> int:
    from llmquant.evals.perplexity import ensure_corpus, format_table, perplexity, write_json
    from llmquant.models import load_model

    args.corpus = str(ensure_corpus(args.corpus))  # before any model is loaded
    rows = []
    for name in args.models:
        model, tok = load_model(name)
        rows.append(perplexity(model, tok, corpus=args.corpus, context=args.context, stride=args.stride,
                               bos=_bos(args, name, tok), max_tokens=args.max_tokens, label=name))
        del model
    print(format_table(rows, PPL_COLUMNS))
    print(protocol_line(rows[0]))
    if args.json:
        write_json(args.json, rows)
    return 0


def run_eval_compare(args: argparse.Namespace) -> int:
    from llmquant.evals.compare import compare
    from llmquant.evals.perplexity import ensure_corpus, format_table, write_json
    from llmquant.models import load_model

    args.corpus = str(ensure_corpus(args.corpus))
    base, tok = load_model(args.base)
    quant, qtok = load_model(args.quant)
    if tok.get_vocab() != qtok.get_vocab():
        raise ValueError("BASE and QUANT have different tokenizers")
    r = compare(base, quant, tok, corpus=args.corpus, context=args.context, stride=args.stride,
                bos=_bos(args, args.base, tok), max_tokens=args.max_tokens, label=args.quant)
    print(format_table([r], [("model", "model"), ("KL mean (nats)", "kl_mean"), ("top-1 agree", "top1_agreement"),
                             ("ppl base", "ppl_base"), ("ppl quant", "ppl_quant"), ("tokens", "tokens_scored")]))
    print(protocol_line(r))
    if args.json:
        write_json(args.json, r)
    return 0


PPL_COLUMNS = [("model", "model"), ("ppl", "ppl"), ("tokens scored", "tokens_scored"),
               ("tok/s", "tokens_per_s"), ("wall s", "wall_s")]


def protocol_line(result: dict) -> str:
    p = result["protocol"]
    return (f"protocol: {Path(p['corpus']).name} sha256={p['corpus_sha256'][:12]}…, context={p['context']}, "
            f"stride={p['stride']}, bos={p['bos']}, first {p['max_tokens'] or 'all'} corpus tokens, "
            f"{result['tokens_scored']} tokens scored")


# --- info -----------------------------------------------------------------------------------------
def checkpoint_info(path: str | Path) -> dict:
    """Per-layer schemes and sizes of a checkpoint, read from config.json and safetensors headers only."""
    from llmquant.checkpoint import SOURCE_BYTES_KEY, SOURCE_DTYPE_KEY, checkpoint_headers, read_safetensors_metadata
    from llmquant.config import QuantConfig

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc is None:
        raise ValueError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    config = QuantConfig.from_dict(qc)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    header = checkpoint_headers(files)
    itemsize = {"I32": 4, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I8": 1}
    layers = []
    for key in sorted(header):
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        n = header[key]["shape"][0]
        k = len_perm = None
        scheme = config.resolve(prefix)
        if scheme is None:
            raise ValueError(f"{prefix} is stored quantized but the config keeps it in float")
        words = header[key]["shape"][1]
        kmax = words // scheme.bits * 32
        ng = header[f"{prefix}.scales"]["shape"][1]
        g = kmax if scheme.group_size == -1 else scheme.group_size
        k = kmax if scheme.group_size == -1 else min(kmax, ng * g)
        if f"{prefix}.perm" in header:
            len_perm = header[f"{prefix}.perm"]["shape"][0]
            k = len_perm
        nbytes = sum(
            itemsize[header[f"{prefix}.{t}"]["dtype"]] * _numel(header[f"{prefix}.{t}"]["shape"])
            for t in ("qweight", "scales", "zeros", "perm", "rot_signs")
            if f"{prefix}.{t}" in header
        )
        layers.append({"name": prefix, "bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym,
                       "act_order": len_perm is not None, "rotated": f"{prefix}.rot_signs" in header,
                       "N": n, "K_max": k, "bytes": nbytes})
    float_bytes = sum(itemsize.get(v["dtype"], 4) * _numel(v["shape"]) for k_, v in header.items()
                      if not any(k_.startswith(lay["name"] + ".") and not k_.endswith(".bias") for lay in layers))
    qbytes = sum(lay["bytes"] for lay in layers)
    meta = read_safetensors_metadata(files[0])
    tensor_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    source_bytes = int(meta[SOURCE_BYTES_KEY]) if meta.get(SOURCE_BYTES_KEY, "").isdigit() else None
    return {
        "path": str(path),
        "quantization_config": qc,
        "layers": layers,
        "linear_bytes": qbytes,
        # bits per quantized weight: codes, scales, zeros, perm and rotation signs over the layers' weights
        "bpw": 8 * qbytes / sum(lay["N"] * lay["K_max"] for lay in layers) if layers else None,
        "linear_fp16_bytes_approx": sum(2 * lay["N"] * lay["K_max"] for lay in layers),
        "float_tensor_bytes": float_bytes,
        "disk_bytes": sum(f.stat().st_size for f in files),
        "tensor_bytes": tensor_bytes,
        "source_dtype": meta.get(SOURCE_DTYPE_KEY),
        "source_tensor_bytes": source_bytes,
        "vs_source": None if not source_bytes else tensor_bytes / source_bytes,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def format_info(info: dict) -> str:
    kern = any("kernel" in lay for lay in info["layers"])
    lines = [f"{'layer':60s} {'bits':>4s} {'group':>5s} {'sym':>5s} {'actord':>6s} {'N x K':>13s} {'KiB':>9s}"
             + (f"  kernel ({info.get('kernels_dtype')} activations)" if kern else "")]
    for lay in info["layers"]:
        lines.append(f"{lay['name']:60s} {lay['bits']:4d} {lay['group_size']:5d} {str(lay['sym']):>5s} "
                     f"{str(lay['act_order']):>6s} {str(lay['N']) + 'x' + str(lay['K_max']):>13s} {lay['bytes'] / 1024:9.1f}"
                     + (f"  {lay['kernel']}" if kern else ""))
    fp16 = info["linear_fp16_bytes_approx"]
    schemes = {(lay["bits"], lay["group_size"], lay["sym"]) for lay in info["layers"]}
    if len(schemes) > 1:
        lines.append("")
        lines.extend(bit_map(info["layers"]))
    lines.append("")
    emb = info["quantization_config"].get("quantize_embedding", False)
    what = "quantized layers (the embedding table among them)" if emb else "quantized linear layers"
    lines.append(f"{what}: {len(info['layers'])}, {info['linear_bytes'] / 2**20:.2f} MiB "
                 f"({info['linear_bytes'] / fp16:.3f}x of fp16 {fp16 / 2**20:.2f} MiB)")
    lines.append(f"bits per quantized weight (codes, scales, zeros, perm, rotation signs): {info['bpw']:.3f}")
    rotated = sum(1 for lay in info["layers"] if lay.get("rotated"))
    if rotated:
        lines.append(f"input rotation ({info['quantization_config'].get('rotation')}, llmquant.formats.rotation): "
                     f"{rotated} of {len(info['layers'])} layers")
    if info["quantization_config"].get("compact_qparams"):
        lines.append("scales and zero points: compact (8-bit codes of a log grid; zero points in the codes' width; "
                     "llmquant.formats.packing)")
    mixed = info["quantization_config"].get("mixed")
    if mixed:
        budget = (f"target {mixed['target_bpw']} bpw" if mixed.get("target_bpw") is not None
                  else f"max_latency {mixed['max_latency']} ms" if mixed.get("max_latency") is not None
                  else f"max_size {mixed.get('max_size')} bytes")
        lines.append(f"mixed precision: {budget}, predicted KL {mixed.get('predicted_kl', float('nan')):.4g} nats/token, "
                     f"chosen from {len(mixed.get('candidates', []))} schemes")
    lines.append(f"other tensors (embeddings, norms, float layers): {info['float_tensor_bytes'] / 2**20:.2f} MiB")
    lines.append(f"safetensors on disk: {info['disk_bytes'] / 2**20:.2f} MiB")
    if info["source_tensor_bytes"]:
        lines.append(f"whole checkpoint: {info['tensor_bytes'] / 2**20:.2f} MiB of tensors = {info['vs_source']:.3f}x "
                     f"the source's {info['source_tensor_bytes'] / 2**20:.2f} MiB ({info['source_dtype']})")
    else:
        lines.append(f"whole checkpoint: {info['tensor_bytes'] / 2**20:.2f} MiB of tensors "
                     "(the source's size is not recorded: quantized from a model built in memory)")
    return "\n".join(lines)


def _scheme_cell(lay: dict) -> str:
    g = "ch" if lay["group_size"] == -1 else str(lay["group_size"])
    return f"{lay['bits']}/{g}{'' if lay['sym'] else 'a'}"


def bit_map(layers: list[dict]) -> list[str]:
    """Per decoder block, each layer's ``bits/group`` (``a``: asymmetric, ``ch``: per channel)."""
    import re

    blocks: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    other = []
    for lay in layers:
        m = re.fullmatch(r"(.*?\.)?(\d+)\.(.+)", lay["name"])
        if m is None:
            other.append(f"{lay['name']}: {_scheme_cell(lay)}")
            continue
        blocks.setdefault(m.group(2), {})[m.group(3)] = _scheme_cell(lay)
        if m.group(3) not in cols:
            cols.append(m.group(3))
    short = [c.rsplit(".", 1)[-1] for c in cols]
    width = max([7] + [len(c) for c in short])
    out = ["bit map (bits/group; a: asymmetric, ch: per channel):",
           f"{'block':>5s} " + " ".join(f"{c:>{width}s}" for c in short)]
    for b, cells in sorted(blocks.items(), key=lambda kv: int(kv[0])):
        out.append(f"{b:>5s} " + " ".join(f"{cells.get(c, '-'):>{width}s}" for c in cols))
    return out + other


def plot_bits(info: dict, path: str) -> None:
    """Bits per weight of each quantized layer, in model order (a PNG)."""
    import re

    from llmquant.evals.sweep import pyplot, save_figure

    plt = pyplot()

    def natural(name: str) -> list:
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]

    lays = sorted(info["layers"], key=lambda lay: natural(lay["name"]))
    bpw = [8 * lay["bytes"] / (lay["N"] * lay["K_max"]) for lay in lays]
    kinds = sorted({lay["name"].rsplit(".", 1)[-1] for lay in lays})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6, len(lays) * 0.06), 3.5), dpi=120)
    ax.bar(range(len(lays)), bpw, color=[colors[lay["name"].rsplit(".", 1)[-1]] for lay in lays], width=1.0)
    for k, c in colors.items():
        ax.bar([], [], color=c, label=k)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("bits per weight")
    ax.set_title(f"{Path(info['path']).name}: {info['bpw']:.3f} bpw")
    ax.legend(fontsize=6, ncol=4)
    save_figure(fig, Path(path))


def add_info(sub) -> None:
    p = sub.add_parser("info", help="per-layer schemes and sizes of a quantized checkpoint")
    p.add_argument("ckpt")
    p.add_argument("--kernels", action="store_true",
                   help="also load the model and say which kernel (and instruction set) runs each layer")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="activation dtype for --kernels")
    p.add_argument("--json")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of each layer's bits per weight")
    p.set_defaults(func=run_info)


def layer_kernels(path: str, dtype_name: str) -> dict[str, str]:
    """Per quantized layer, what runs it for ``dtype_name`` activations on this machine."""
    import torch

    from llmquant.models import load_model
    from llmquant.modules.quant_linear import QuantLinear

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, _ = load_model(path, dtype=dtype)
    return {name: (m.kernel_description(dtype) if getattr(m, "serves_head", True) else "lookup (dequantizes the rows asked for)")
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def run_info(args: argparse.Namespace) -> int:
    info = checkpoint_info(args.ckpt)
    if args.kernels:
        kernels = layer_kernels(args.ckpt, args.dtype)
        for lay in info["layers"]:
            lay["kernel"] = kernels.get(lay["name"], "not loaded")
        info["kernels_dtype"] = args.dtype
    print(format_info(info))
    if args.plot:
        plot_bits(info, args.plot)
        print(f"plot of bits per layer: {args.plot}")
    if args.json:
        from llmquant.evals.perplexity import write_json

        write_json(args.json, info)
    return 0


# --- timing ---------------------------------------------------------------------------------------
def add_timing(sub) -> None:
    p = sub.add_parser("timing", help="time every scheme on a model's layer shapes here (for --max-latency)")
    p.add_argument("model", help="built-in name, folder or hub id (only its layer shapes are used)")
    p.add_argument("out", help="the timing table to write (JSON)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="activation dtype")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[-1, 32, 64, 128])
    p.add_argument("--no-perm", action="store_true", help="layers without act-order's perm (default: with)")
    p.add_argument("--quantize-lm-head", action="store_true", help="time the output layer's shape too")
    p.add_argument("--reps", type=int, default=50)
    p.set_defaults(func=run_timing)


def run_timing(args: argparse.Namespace) -> int:
    import torch

    from llmquant.mixed.cost import candidates
    from llmquant.mixed.latency import measure_table, save_table
    from llmquant.config import QuantConfig
    from llmquant.models import load_model
    from llmquant.modules.walk import linear_weight
    from llmquant.quantizers.plan import plan

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, _ = load_model(args.model)
    shapes = {tuple(linear_weight(m).shape) for _, m, _ in plan(model, QuantConfig(quantize_lm_head=args.quantize_lm_head))}
    del model
    table = measure_table(shapes, candidates(args.bits, args.group_sizes), perm=not args.no_perm, dtype=dtype,
                          reps=args.reps)
    save_table(table, args.out)
    m = table["machine"]
    print(f"timing table for {len(shapes)} shapes x {len(table['entries'][next(iter(table['entries']))])} schemes "
          f"({m['cpu']}, {m['isa']}, {m['threads']} threads, {m['dtype']}): {args.out}")
    return 0


# --- export-gptq ----------------------------------------------------------------------------------
def add_export_gptq(sub) -> None:
    p = sub.add_parser("export-gptq", help="write a checkpoint in the standard GPTQ layout (vLLM's gptq method)")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_export_gptq)


def run_export_gptq(args: argparse.Namespace) -> int:
    from llmquant.export.gptq import export_gptq_checkpoint

    out = export_gptq_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
    print(f"wrote GPTQ-layout checkpoint to {out}")
    return 0


def add_export_compressed_tensors(sub) -> None:
    p = sub.add_parser("export-compressed-tensors",
                       help="write a checkpoint in compressed-tensors' pack-quantized format (llm-compressor's; "
                            "vLLM and transformers load it natively), per-layer schemes included")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_export_compressed_tensors)


def run_export_compressed_tensors(args: argparse.Namespace) -> int:
    from llmquant.export.compressed_tensors import export_compressed_tensors_checkpoint

    out = export_compressed_tensors_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
    print(f"wrote compressed-tensors (pack-quantized) checkpoint to {out}")
    return 0


# --- demo -----------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    from llmquant.models import DEFAULT_MODEL

    p = sub.add_parser("demo", help="quantize the default model to INT4 and compare its perplexity with float")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="llmquant-demo", help="folder for the checkpoint and results.json")
    add_scheme_args(p)
    _add_protocol_args(p, DEMO_MAX_TOKENS)
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import llmquant
    from llmquant.evals.perplexity import ensure_corpus, format_table, perplexity, write_json
    from llmquant.models import load_model

    out = Path(args.out)
    t0 = time.perf_counter()
    args.corpus = str(ensure_corpus(args.corpus))  # fail (saying how to fix it) before the slow part
    model, tok = load_model(args.model)
    bos = _bos(args, args.model, tok)
    proto = dict(corpus=args.corpus, context=args.context, stride=args.stride, bos=bos, max_tokens=args.max_tokens)
    base = perplexity(model, tok, label=f"{args.model} float", **proto)
    summary = quantize_model(args, model, tok)
    llmquant.save_quantized(model, out / "checkpoint", tok, overwrite=True)
    del model
    qmodel, _ = load_model(str(out / "checkpoint"))  # score what was saved, not what is in memory
    label = f"{args.model} int{args.bits} g{args.group_size} {args.method}{' asym' if args.asym else ''}"
    q = perplexity(qmodel, tok, label=label, **proto)
    info = checkpoint_info(out / "checkpoint")
    q["linear_bytes"] = info["linear_bytes"]
    q["quantize_seconds"] = summary["seconds"]
    for r in (base, q):
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
    print()
    print(format_table([base, q], PPL_COLUMNS[:2] + [("Δ ppl %", "ppl_increase_pct")] + PPL_COLUMNS[2:]))
    print(protocol_line(base))
    print(f"linear layers: {info['linear_bytes'] / 2**20:.1f} MiB quantized vs "
          f"{info['linear_fp16_bytes_approx'] / 2**20:.1f} MiB fp16; total {time.perf_counter() - t0:.0f} s")
    write_json(out / "results.json", {"float": base, "quantized": q, "checkpoint": str(out / "checkpoint")})
    print(f"results: {out / 'results.json'}; checkpoint: {out / 'checkpoint'}")
    return 0


# --- serve ----------------------------------------------------------------------------------------
def add_serve(sub) -> None:
    try:
        from llmquant.serving.cli import add_serve_parser
    except ImportError as e:  # the serving extra is not installed
        p = sub.add_parser("serve", help="OpenAI-compatible server (needs: pip install 'llmquant[serve]')")
        p.set_defaults(func=lambda args, e=e: _missing_serve(e))
        return
    add_serve_parser(sub)


def _missing_serve(e: ImportError) -> int:
    raise ModuleNotFoundError(f"llmquant serve needs the serving extra: pip install 'llmquant[serve]' ({e})")
