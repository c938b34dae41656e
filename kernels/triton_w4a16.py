"""W4A16 fused dequant-GEMM in Triton: ``y = x[..., perm] @ dequant(W).T + bias`` in one pass.

Runs 4-bit layers (and 2-, 3- and 8-bit ones; 3-bit codes, which straddle int32 words in the stored
stream, are split at ``prepare()`` into a 2-bit and a 1-bit plane, 3 bits a code still) with
fp16, bf16 or fp32 activations, symmetric or asymmetric, any group size including a ragged last
group. The weight stays packed in memory; each program unpacks its tile in registers, scales it and
feeds the matrix units.

Layout: ``prepare()`` transposes the stored tensors to K-major (``qweight_t`` int32 [KW, N],
``scales_t`` fp16 [NG, N], ``zeros_t`` uint8 [NG, N]); see :mod:`llmquant.kernels.triton_w4a16_jit`
for the details. Nothing of it is written to disk, and it is the only copy of the codes a layer
keeps (``unpack_qweight`` rebuilds the stored ``qweight`` exactly, to save or move the layer).

Tiling (``pick_config``): decode-sized M (<= 16) uses 16-row tiles and splits K across programs,
at least 8 ways (fp32 partial sums, added in a fixed order by one more launch that also adds the
bias and casts, so results are deterministic); larger M uses 32..128-row tiles ordered in bands for
L2 reuse, 128 rows wherever M allows (each dequantized weight tile then serves 128 rows of x: the
program is bound by the instructions that dequantize, not by memory or the matrix units). Measured
on one GPU only (an H200, ``bench/results/triton-h200*``): there decode runs at 0.84-1.03x the speed
of cuBLAS fp16 on the Llama-7B shapes, prefill at 0.4-0.6x; the decode split and the prefill tiles
are what its sweeps favoured.

Act-order: the activations are gathered by ``perm`` before the launch, so the program reads an
act-order layer exactly like a plain one.

The launch is the custom op ``torch.ops.llmquant.triton_dequant_gemm`` (with a fake implementation),
so ``torch.compile`` traces through it. Triton itself is imported on the first launch only.

Devices: CUDA; or the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
the first launch (slow; for tests; the interpreter has no bf16 arithmetic).
"""
import functools
import importlib.util
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from llmquant.formats.packing import num_groups, pack_rows, packed_words, unpack_rows
from llmquant.kernels.registry import KernelSpec, PackedWeight

SUPPORTED_BITS = (2, 3, 4, 8)  # 3-bit: repacked at prepare() into a 2-bit and a 1-bit plane
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = ("1", "true", "on")  # what Triton itself accepts for TRITON_INTERPRET


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@dataclass(frozen=True)
class TritonConfig:
    """One launch configuration. ``unpack``: "reshape" loads each word once and splits it in
    registers; "gather" loads each code's word (each word PER times, from cache). Compiled for
    sm_90, "gather" stages 3x the shared memory (127 KB against 41 KB for the decode tile).
    ``deq``: how codes become floats: "cvt" converts q - z (an integer-to-float instruction per
    code); "magic" ORs q into the bits of 1024.0 (fp16) or 2**23 (fp32) and subtracts 1024 + z or
    2**23 + z, the same value with no conversion instruction. ``operands``: "xw" multiplies x by
    the dequantized tile; "wx" computes y^T = W x^T, the tile as the left operand (on Hopper the
    warp-group MMA reads its left operand from registers; "reshape" unpacking only). ``prefetch``:
    1 loads the next K tile's scales (and zero points) one iteration ahead, into registers, when a
    tile lies in one group; 0 loads them where they are used. Triton's pipeliner does not stage that
    load (the sm_90 program shows a plain load awaited in every iteration), so without the prefetch
    each K tile waits for a global load's latency."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    unpack: str = "reshape"
    deq: str = "cvt"
    operands: str = "xw"
    prefetch: int = 1

    _UNPACK = ("gather", "reshape")
    _DEQ = ("cvt", "magic")
    _OPERANDS = ("xw", "wx")

    def to_list(self) -> list[int]:
        return [
            self.block_m, self.block_n, self.block_k, self.split_k,
            self.group_m, self.num_warps, self.num_stages, self._UNPACK.index(self.unpack),
            self._DEQ.index(self.deq), self._OPERANDS.index(self.operands), self.prefetch,
        ]  # fmt: skip

    @classmethod
    def from_list(cls, v: list[int]) -> "TritonConfig":
        if len(v) not in (10, 11):
            raise ValueError(f"a TritonConfig list has 11 ints (10 before prefetch), got {len(v)}: {v}")
        return cls(*v[:7], unpack=cls._UNPACK[v[7]], deq=cls._DEQ[v[8]], operands=cls._OPERANDS[v[9]],
                   prefetch=v[10] if len(v) == 11 else 1)  # fmt: skip

    def check(self) -> None:
        # Powers of two >= 16 also hold whole words: 32 // bits <= 16 codes per word.
        for name in ("block_m", "block_n", "block_k"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {b}")
        if self.split_k < 1 or self.group_m < 1:
            raise ValueError(f"split_k and group_m must be >= 1, got {self.split_k}, {self.group_m}")
        if self.unpack not in self._UNPACK:
            raise ValueError(f"unpack must be one of {self._UNPACK}, got {self.unpack!r}")
        if self.deq not in self._DEQ:
            raise ValueError(f"deq must be one of {self._DEQ}, got {self.deq!r}")
        if self.operands not in self._OPERANDS:
            raise ValueError(f"operands must be one of {self._OPERANDS}, got {self.operands!r}")
        if self.prefetch not in (0, 1):
            raise ValueError(f"prefetch must be 0 or 1, got {self.prefetch}")
        if self.operands == "wx" and self.unpack != "reshape":
            raise ValueError('operands="wx" unpacks by "reshape" only')


def _split_k_tiles(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits actually used, K tiles per split): no split is left empty."""
    k_tiles = -(-k // block_k)
    per = -(-k_tiles // max(1, min(split_k, k_tiles)))
    return -(-k_tiles // per), per


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> TritonConfig:
    """A heuristic launch config for an [M, K] x [K, N] product with groups of ``group_size``
    (already resolved: K for one group per row). ``num_sms``: multiprocessors to fill."""
    if m <= 16:  # decode: memory-bound; the matrix units idle, so 16 padded rows cost nothing
        bm, bn, bk_max, warps, stages = 16, 64, 128, 4, 4
    elif m <= 32:
        bm, bn, bk_max, warps, stages = 32, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk_max, warps, stages = 64, 64, 64, 4, 4
    elif -(-m // 128) * -(-n // 128) >= num_sms:
        bm, bn, bk_max, warps, stages = 128, 128, 64, 8, 3
    else:
        # Too few 128x128 tiles to fill the GPU: halve the tile along N, not M. The program is bound
        # by the instructions that dequantize its weight tile (an H200 profile: 1.3 instructions a
        # cycle, the SMs 28% busy), and 128 rows of x share each dequantized tile where 64 did.
        # H200, 4096x4096 at M = 256: 69 -> 45 us (64x128 before; bench/results/triton-h200*).
        bm, bn, bk_max, warps, stages = 128, 64, 64, 4, 4
    # A block_k that divides G keeps each K tile inside one group (one scale row per tile).
    bk = bk_max
    if num_groups(k, group_size) > 1:
        while bk > 16 and group_size % bk:
            bk //= 2
        if group_size % bk:
            bk = bk_max  # odd group size: per-element scale gather
    tiles = -(-m // bm) * -(-n // bn)
    split = 1
    if m <= 16:
        # Decode: split K at least 8 ways (down to one K tile a split), more when the output tiles
        # are few. On an H200 (bench/results/triton-h200*), 8 splits beat the 1-5 that filling the
        # SMs alone gave on every decode shape swept (Llama-7B projections, up to 1.4x on 11008x4096).
        k_tiles = -(-k // bk)
        split = max(1, min(max(8, -(-2 * num_sms // tiles)), k_tiles))
    elif m <= 64 and tiles < num_sms:
        # Too few output tiles to fill the GPU: split K (>= 2 K tiles per split). Only for small M,
        # where the fp32 partial sums [SPLIT_K, M, N] are small next to the weight.
        k_tiles = -(-k // bk)
        split = max(1, min(-(-2 * num_sms // tiles), k_tiles // 2))
    elif tiles < num_sms and -(-k // bk) >= 64:
        # Prefill with fewer 128x64 tiles than SMs and a long K: two K halves. H200 (triton-h200*):
        # 4096x4096 at M = 128 44 -> 34 us, at 256 44 -> 41 us; 4096x11008 114 -> 83 and 114 -> 97 us;
        # with K = 576 or 640 (gemma3, smollm2) the split was slower, so short K keeps one.
        split = 2
        if m >= 256:
            # and 256-row tiles on 8 warps: each dequantized tile serves twice the rows. H200
            # (triton-h200-tiles.txt), M = 256: 4096x4096 41 -> 38 us, 4096x11008 98 -> 89 us.
            bm, warps, stages = 256, 8, 3
    return TritonConfig(bm, bn, bk, split, 8, warps, stages)


@functools.lru_cache(maxsize=None)
def sm_count(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 1  # the interpreter runs programs one after another: fewer, larger ones are faster


def _plane_words(k: int, bits: int) -> int:
    """Rows of ``qweight_t``: the stored words, or for 3 bits the low 2-bit plane's."""
    return packed_words(k, 2 if bits == 3 else bits)


def _check_operands(x, qweight_t, qhigh_t, scales_t, zeros_t, bias, bits, group_size) -> tuple[int, int, int]:
    # x: float [M, K]; qweight_t: int32 [KW, N]; qhigh_t: int32 [ceil(K/32), N] (3-bit only);
    # scales_t: fp16 [NG, N]; zeros_t: uint8 [NG, N]
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if x.dim() != 2 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be [M, K] fp16/bf16/fp32, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if k < 1 or group_size < 1:
        raise ValueError(f"K and the group size must be >= 1, got K={k}, G={group_size}")
    kw = _plane_words(k, bits)
    if qweight_t.dim() != 2 or qweight_t.dtype != torch.int32 or qweight_t.shape[0] != kw:
        raise ValueError(
            f"qweight_t must be int32 [{kw}, N] for K={k}, bits={bits}, got {qweight_t.dtype} {tuple(qweight_t.shape)}"
        )
    n = qweight_t.shape[1]
    if (bits == 3) != (qhigh_t is not None):
        raise ValueError("qhigh_t (the third bits' plane) goes with 3-bit layers, and only with them")
    if qhigh_t is not None and (qhigh_t.dtype != torch.int32 or tuple(qhigh_t.shape) != (-(-k // 32), n)):
        raise ValueError(f"qhigh_t must be int32 [{-(-k // 32)}, N={n}], got {qhigh_t.dtype} {tuple(qhigh_t.shape)}")
    ng = num_groups(k, group_size)
    if scales_t.dtype != torch.float16 or tuple(scales_t.shape) != (ng, n):
        raise ValueError(
            f"scales_t must be fp16 [NG={ng}, N={n}] for K={k}, G={group_size}, "
            f"got {scales_t.dtype} {tuple(scales_t.shape)}"
        )
    if zeros_t is not None and (zeros_t.dtype != torch.uint8 or tuple(zeros_t.shape) != (ng, n)):
        raise ValueError(f"zeros_t must be uint8 [NG={ng}, N={n}], got {zeros_t.dtype} {tuple(zeros_t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    for name, t in (("qweight_t", qweight_t), ("qhigh_t", qhigh_t), ("scales_t", scales_t), ("zeros_t", zeros_t),
                    ("bias", bias)):  # fmt: skip
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return m, n, k


@torch.library.custom_op("llmquant::triton_dequant_gemm", mutates_args=())
def triton_dequant_gemm_op(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    qhigh_t: Optional[torch.Tensor],
    scales_t: torch.Tensor,
    zeros_t: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    config: list[int],
) -> torch.Tensor:
    """x fp16/bf16/fp32 [M, K] -> y [M, N] in x's dtype; ``config``: ``TritonConfig.to_list()`` or
    ``[]`` for :func:`pick_config`. ``group_size`` >= 1 (K for one group per row)."""
    m, n, k = _check_operands(x, qweight_t, qhigh_t, scales_t, zeros_t, bias, bits, group_size)
    if m == 0:
        return x.new_empty((0, n))
    if config:
        cfg = TritonConfig.from_list(list(config))
    else:
        cfg = pick_config(m, n, k, group_size, sm_count(x.device.type, x.device.index))
    cfg.check()
    if bits == 3 and cfg.block_k < 32:
        raise ValueError(f"3-bit layers need block_k >= 32 (one word of third bits a tile), got {cfg.block_k}")
    split, tiles_per_split = _split_k_tiles(k, cfg.block_k, cfg.split_k)
    cfg = replace(cfg, split_k=split)

    from llmquant.kernels import triton_w4a16_jit as jit  # imports triton (see that module)

    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split == 1:
        jit.launch(x, qweight_t, qhigh_t, scales_t, zeros_t, bias, y, bits=bits, group_size=group_size,
                   cfg=cfg, tiles_per_split=tiles_per_split)  # fmt: skip
        return y
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    jit.launch(x, qweight_t, qhigh_t, scales_t, zeros_t, None, part, bits=bits, group_size=group_size,
               cfg=cfg, tiles_per_split=tiles_per_split)  # fmt: skip
    jit.splitk_sum(part, bias, y)  # in split order (deterministic), + bias, cast: one launch
    return y


@triton_dequant_gemm_op.register_fake
def _(x, qweight_t, qhigh_t, scales_t, zeros_t, bias, bits, group_size, config):
    m, n, _k = _check_operands(x, qweight_t, qhigh_t, scales_t, zeros_t, bias, bits, group_size)
    return x.new_empty((m, n))


@dataclass
class TritonWeight:
    """The layout the Triton program reads, derived from a :class:`PackedWeight` by ``prepare``."""

    qweight_t: torch.Tensor  # int32 [KW, N] (3-bit: the low 2-bit plane, [ceil(K/32)*2, N])
    scales_t: torch.Tensor  # fp16 [NG, N]
    zeros_t: Optional[torch.Tensor]  # uint8 [NG, N] (asymmetric) or None
    perm: Optional[torch.Tensor]  # int64 [K] (act-order) or None
    bits: int
    group_size: int  # resolved: K when the layer has one group per row
    in_features: int  # K
    out_features: int  # N
    qhigh_t: Optional[torch.Tensor] = None  # 3-bit: int32 [ceil(K/32), N], bit k % 32 of word k // 32


def _pack_bits(b: torch.Tensor) -> torch.Tensor:
    """0/1 codes [N, K] -> int32 [N, ceil(K/32)]: code k is bit k % 32 of word k // 32."""
    n, k = b.shape
    nw = -(-k // 32)
    padded = torch.zeros(n, nw * 32, dtype=torch.int64, device=b.device)
    padded[:, :k] = b
    words = (padded.view(n, nw, 32) << torch.arange(32, device=b.device)).sum(-1)
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1
    return bits.reshape(w.shape[0], -1)[:, :k].to(torch.uint8)


def prepare_weight(w: PackedWeight) -> TritonWeight:
    n, k = w.out_features, w.in_features
    if w.bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton kernel runs bits in {SUPPORTED_BITS}, got {w.bits}")
    ng = num_groups(k, w.group_size)
    kw = packed_words(k, w.bits)
    if tuple(w.qweight.shape) != (n, kw) or w.qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [N={n}, {kw}], got {w.qweight.dtype} {tuple(w.qweight.shape)}")
    if tuple(w.scales.shape) != (n, ng):
        raise ValueError(f"scales must be [N={n}, NG={ng}], got {tuple(w.scales.shape)}")
    if w.zeros is not None and tuple(w.zeros.shape) != (n, ng):
        raise ValueError(f"zeros must be [N={n}, NG={ng}], got {tuple(w.zeros.shape)}")
    if w.perm is not None and tuple(w.perm.shape) != (k,):
        raise ValueError(f"perm must be [K={k}], got {tuple(w.perm.shape)}")
    qweight, qhigh_t = w.qweight, None
    if w.bits == 3:  # codes straddle words in the stored stream: split into planes the program reads whole
        codes = unpack_rows(w.qweight, 3, k)
        qweight = pack_rows(codes & 3, 2)
        qhigh_t = _pack_bits(codes >> 2).t().contiguous()
    return TritonWeight(
        qhigh_t=qhigh_t,
        qweight_t=qweight.t().contiguous(),
        scales_t=w.scales.to(torch.float16).t().contiguous(),
        zeros_t=None if w.zeros is None else w.zeros.to(torch.uint8).t().contiguous(),
        perm=None if w.perm is None else w.perm.to(torch.long),
        bits=w.bits,
        group_size=k if w.group_size == -1 else w.group_size,
        in_features=k,
        out_features=n,
    )


def dequant_gemm(
    x: torch.Tensor,
    w: TritonWeight,
    bias: Optional[torch.Tensor] = None,
    config: Optional[TritonConfig] = None,
) -> torch.Tensor:
    """y = x[..., perm] @ dequant(W).T + bias. x: fp16/bf16/fp32 [..., K] -> [..., N] in x's dtype.

    ``config`` overrides :func:`pick_config` (tests and benchmarks use it).
    """
    # x: float [..., K]; w.qweight_t: int32 [KW, N]; w.scales_t: fp16 [NG, N]; bias: float [N]
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects K={w.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    y = torch.ops.llmquant.triton_dequant_gemm(
        x2, w.qweight_t, w.qhigh_t, w.scales_t, w.zeros_t, bias, w.bits, w.group_size,
        [] if config is None else config.to_list(),
    )  # fmt: skip
    return y.reshape(*lead, w.out_features)


class TritonKernel:
    name = "triton"

    def can_implement(self, spec: KernelSpec) -> tuple[bool, str]:
        why = []
        if spec.bits not in SUPPORTED_BITS:
            why.append(f"bits={spec.bits} not supported (only {SUPPORTED_BITS})")
        if spec.dtype not in SUPPORTED_DTYPES:
            why.append(f"activation dtype {spec.dtype} not supported (fp16, bf16, fp32)")
        if importlib.util.find_spec("triton") is None:
            why.append("triton is not installed (pip install 'llmquant[triton]')")
        if spec.act_int8:
            why.append("dynamic INT8 activations run on the CPU kernel (and the reference) only")
        if spec.device_type == "cuda":
            if not torch.cuda.is_available():
                why.append("CUDA is not available")
            elif torch.version.hip is None and torch.cuda.get_device_capability() < (8, 0):
                cap = torch.cuda.get_device_capability()
                why.append(f"compute capability {cap} < 8.0 (the kernel is built and checked for sm_80+ only)")
        elif spec.device_type == "cpu" and interpreter_enabled():
            if spec.dtype == torch.bfloat16:
                why.append("the Triton interpreter (TRITON_INTERPRET=1) has no bf16 arithmetic")
        else:
            why.append(
                f"device {spec.device_type!r} is not CUDA (the CPU runs it only through the Triton "
                "interpreter, TRITON_INTERPRET=1, for tests)"
            )
        return not why, "; ".join(why)

    def prepare(self, w: PackedWeight, act_int8: bool = False) -> TritonWeight:
        return prepare_weight(w)

    def unpack_qweight(self, state: TritonWeight) -> torch.Tensor:
        """The stored ``qweight`` back from the layout, exactly: the module need not keep both."""
        if state.bits != 3:
            return state.qweight_t.t().contiguous()
        k = state.in_features
        codes = unpack_rows(state.qweight_t.t().contiguous(), 2, k) | (_unpack_bits(state.qhigh_t.t(), k) << 2)
        return pack_rows(codes, 3)

    def apply(self, state: TritonWeight, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return dequant_gemm(x, state, bias)
