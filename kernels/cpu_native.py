"""Finds and loads the native CPU kernel library (``kernels/csrc``, built by ``setup.py``) with ctypes.

The library is a plain shared object with a C ABI (no torch or Python headers); ctypes releases the
GIL for the duration of each call. :func:`load` runs once per process: when the library is missing
(no C compiler at install time), was built for another ABI version, or cannot be loaded, it logs one
warning and every caller gets ``None`` with the reason, so the kernel registry falls back to the
reference kernel.

Instruction sets, best first: on x86-64 ``avx512_bf16`` > ``avx512`` > ``avx2`` > ``scalar``, on
AArch64 ``neon_dotprod`` > ``neon`` > ``scalar``. The library picks the best one the CPU supports;
``LLMQUANT_CPU_ISA=<name>`` caps it (tests, benchmarks, or a CPU whose AVX-512 is slower than its
AVX2); a name of the other architecture is refused.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
import platform
from pathlib import Path

import torch

from llmquant.kernels.registry import env_switch

logger = logging.getLogger(__name__)

ABI_VERSION = 7  # must match LQ_ABI_VERSION in kernels/csrc/lq_api.c
#: LQ_ISA_* in lq_cpu.h, by number ("avx2_vnni", numbered last, ranks between avx2 and avx512)
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512_bf16", "neon", "neon_dotprod", "avx2_vnni")
#: the instruction sets of each architecture, weakest first (each also has "scalar"); avx2_vnni is AVX2 with
#: AVX-VNNI, which some AVX-512 CPUs lack (a cap at it runs avx2 there)
ISA_FAMILIES = {"x86_64": ("scalar", "avx2", "avx2_vnni", "avx512", "avx512_bf16"),
                "aarch64": ("scalar", "neon", "neon_dotprod")}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_STEM = "_lqcpu"

_vp, _i32, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def library_path() -> Path | None:
    """Where the built library is, or None."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"{_STEM}{suffix}"
        if p.is_file():
            return p
    return None


class NativeError(RuntimeError):
    """The native library failed for a reason other than invalid arguments (out of memory)."""


class Weights(ctypes.Structure):
    """``lq_weights`` in kernels/csrc/lq_api.c: one layer in the run-time layout. It holds raw
    pointers: whoever keeps it must keep the tensors alive (``CpuLayout`` does)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("s", ctypes.c_void_p),
        ("z", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("G", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("zc", ctypes.c_int32),
    ]


FLAG_F32_VIA_BF16 = 1  # LQ_FLAG_F32_VIA_BF16
FLAG_F32_NO_INT = 2  # LQ_FLAG_F32_NO_INT
FLAG_A8 = 4  # LQ_FLAG_A8: dynamic INT8 activations


class Native:
    """Typed wrappers around the exported functions."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._lib = lib
        lib.lq_detect_isa.restype = _i32
        lib.lq_detect_isa.argtypes = []
        lib.lq_isa_name.restype = ctypes.c_char_p
        lib.lq_isa_name.argtypes = [_i32]
        lib.lq_last_error.restype = ctypes.c_char_p
        lib.lq_last_error.argtypes = []
        # w, x, x dtype, M, bias, y, threads, isa, flags
        lib.lq_linear.restype = _i32
        lib.lq_linear.argtypes = [ctypes.POINTER(Weights), _vp, _i32, _i64, _vp, _vp, _i32, _i32, _i32]
        # w, out dtype, out, isa
        lib.lq_dequantize.restype = _i32
        lib.lq_dequantize.argtypes = [ctypes.POINTER(Weights), _i32, _vp, _i32]
        lib.lq_hadamard128.restype = _i32
        lib.lq_hadamard128.argtypes = [_vp, _vp, _i64, _i64]
        lib.lq_has_vnni.restype = _i32
        lib.lq_has_vnni.argtypes = []
        lib.lq_has_avx_vnni.restype = _i32
        lib.lq_has_avx_vnni.argtypes = []
        lib.lq_set_openmp.restype = _i32
        lib.lq_set_openmp.argtypes = [_vp, _vp, _vp]
        lib.lq_set_prefetch.restype = _i32
        lib.lq_set_prefetch.argtypes = [_i32, _i32]
        lib.lq_get_prefetch.restype = _i32
        lib.lq_get_prefetch.argtypes = [_i32]
        self.detected_isa = ISA_NAMES[lib.lq_detect_isa()]
        # fp32 decode (M = 1) of 4-bit layers runs on integer dot products (see kernels/cpu.py)
        self.has_vnni = bool(lib.lq_has_vnni())
        #: AVX-VNNI (vpdpbusd on ymm): the avx2_vnni table
        self.has_avx_vnni = bool(lib.lq_has_avx_vnni())
        #: what layers run on: the detected instruction set, capped by LLMQUANT_CPU_ISA (read at load)
        cap = requested_isa()
        self.isa = self.detected_isa if cap < 0 else min(ISA_NAMES[cap], self.detected_isa, key=isa_rank)
        if self.isa == "avx2_vnni" and not self.has_avx_vnni:
            self.isa = "avx2"

    @property
    def prefetch(self) -> tuple[int, int]:
        """Bytes ahead the x86 GEMVs (AVX2, AVX-512) prefetch their codes into L1 and into L2 (0: no such prefetch): the
        measured defaults (lq_api.c), or what was set."""
        return self._lib.lq_get_prefetch(1), self._lib.lq_get_prefetch(2)

    @prefetch.setter
    def prefetch(self, l1_l2: tuple[int, int]) -> None:
        self._check(self._lib.lq_set_prefetch(*l1_l2), "prefetch distances")

    def _check(self, rc: int, what: str) -> None:
        if rc == 0:
            return
        msg = self._lib.lq_last_error().decode(errors="replace")
        if rc == -1:
            raise ValueError(f"{what}: {msg}")
        raise NativeError(f"{what} failed ({rc}): {msg}")

    def linear(self, w: Weights, x, bias, y, threads: int, isa: int, flags: int = 0) -> None:
        """y[M, N] = x[M, K] @ W.T + bias: contiguous CPU tensors, already checked; bias fp32 or None."""
        rc = self._lib.lq_linear(
            ctypes.byref(w), x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0],
            None if bias is None else bias.data_ptr(), y.data_ptr(), threads, isa, flags,
        )  # fmt: skip
        self._check(rc, "llmquant CPU kernel")

    def dequantize(self, w: Weights, out, isa: int) -> None:
        """out[N, K] (fp32 or bf16) = the weight, as the given ISA's dequantization computes it."""
        self._check(self._lib.lq_dequantize(ctypes.byref(w), DTYPE_CODES[out.dtype], out.data_ptr(), isa), "llmquant CPU dequantize")

    def hadamard128(self, x, d) -> None:
        """x[..., K] <- x diag(d) B in place (llmquant.formats.rotation): contiguous fp32 CPU tensors, d [K]."""
        k = x.shape[-1]
        self._check(self._lib.lq_hadamard128(x.data_ptr(), d.data_ptr(), x.numel() // max(k, 1), k),
                    "llmquant input rotation")

    def use_threads(self, which: str) -> str:
        """Where parallel parts run: "openmp" (the OpenMP runtime torch has loaded: its threads, so the
        library's calls do not compete with torch's spinning workers for the cores) or "pool" (the
        library's own threads). Returns what is in use: "pool" when torch's runtime is not found."""
        if which not in ("openmp", "pool"):
            raise ValueError(f"threads {which!r}: expected 'openmp' or 'pool'")
        entry = torch_openmp_entry_points() if which == "openmp" else None
        self._check(self._lib.lq_set_openmp(*(entry or (None, None, None))), "llmquant CPU threads")
        return "openmp" if entry else "pool"


def torch_openmp_entry_points() -> tuple[int, int, int] | None:
    """GOMP_parallel, omp_get_thread_num and omp_get_num_threads of the OpenMP runtime that torch
    loaded (libgomp, or Intel's / LLVM's, which export the same names), or None. Only a library
    already in the process is used (RTLD_NOLOAD): never a second runtime."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    candidates = sorted(lib_dir.glob("libgomp*.so*")) + sorted(lib_dir.glob("libiomp5*.so*")) + sorted(lib_dir.glob("libomp*.so*"))
    noload = getattr(os, "RTLD_NOLOAD", 0)
    if not noload:
        return None
    for path in candidates:
        try:
            rt = ctypes.CDLL(str(path), mode=noload | os.RTLD_LAZY)
            names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
            return tuple(ctypes.cast(getattr(rt, n), ctypes.c_void_p).value for n in names)  # type: ignore[return-value]
        except (OSError, AttributeError):
            continue
    return None


def requested_threads() -> str:
    """LLMQUANT_CPU_THREADS: "openmp" (default) or "pool"."""
    v = os.environ.get("LLMQUANT_CPU_THREADS", "").strip() or "openmp"
    if v not in ("openmp", "pool"):
        raise ValueError(f"LLMQUANT_CPU_THREADS={v!r}: expected 'openmp' or 'pool'")
    return v


def requested_prefetch() -> tuple[int, int] | None:
    """LLMQUANT_CPU_PREFETCH="L1,L2": bytes ahead the x86 GEMVs prefetch their codes into L1 and into
    L2 (multiples of 64, 0: none), for tuning a CPU the defaults were not measured on; unset: the
    measured defaults (2048, 16384)."""
    v = os.environ.get("LLMQUANT_CPU_PREFETCH", "").strip()
    if not v:
        return None
    try:
        l1, l2 = (int(p) for p in v.split(","))
    except ValueError:
        raise ValueError(f"LLMQUANT_CPU_PREFETCH={v!r}: expected two byte counts, e.g. '2048,16384'") from None
    return l1, l2


def isa_family(isa: str) -> tuple[str, ...]:
    """The instruction sets of isa's architecture, weakest first ("scalar": this machine's)."""
    for fam in ISA_FAMILIES.values():
        if isa != "scalar" and isa in fam:
            return fam
    return ISA_FAMILIES.get(platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64"), ("scalar",))


def isa_rank(isa: str) -> int:
    """Position of isa in its architecture's order (scalar 0)."""
    return isa_family(isa).index(isa)


def isas_up_to(detected: str, avx_vnni: bool = True) -> tuple[str, ...]:
    """Every instruction set a CPU whose best is ``detected`` can run, weakest first (``avx_vnni``: whether
    it has AVX-VNNI, which an AVX-512 CPU may lack)."""
    fam = isa_family(detected)
    return tuple(i for i in fam[: fam.index(detected) + 1] if avx_vnni or i != "avx2_vnni")


def isa_index(name: str) -> int:
    if name not in ISA_NAMES:
        raise ValueError(f"unknown CPU instruction set {name!r}; expected one of {ISA_NAMES}")
    here = isa_family("scalar")
    if name not in here:
        raise ValueError(f"CPU instruction set {name!r} is not one of this machine's ({platform.machine()}): {here}")
    return ISA_NAMES.index(name)


def requested_isa() -> int:
    """The cap from LLMQUANT_CPU_ISA, or -1 (the best the CPU has)."""
    v = env_switch("LLMQUANT_CPU_ISA")
    return _isa_index_cached(v) if v else -1


_isa_index_cached = functools.cache(isa_index)  # read on every call of a layer (an error is not cached)


def fp32_gemv_flags() -> int:
    """LLMQUANT_CPU_FP32_GEMV=fma keeps fp32 decode (M = 1) on the FMA GEMV instead of the VNNI
    integer one ("int", the default where the CPU has VNNI); for comparisons and diagnosis."""
    v = env_switch("LLMQUANT_CPU_FP32_GEMV")
    if v in ("", "int"):
        return 0
    if v == "fma":
        return FLAG_F32_NO_INT
    raise ValueError(f"LLMQUANT_CPU_FP32_GEMV={v!r}: expected 'int' or 'fma'")


@functools.cache
def load() -> tuple[Native | None, str]:
    """The library, or None and why not (logged once)."""
    path = library_path()
    if path is None:
        why = (
            "the native CPU kernel library was not built (no C compiler when llmquant was installed?); "
            "reinstall with a C compiler to build it"
        )
    else:
        try:
            lib = ctypes.CDLL(str(path))
            version = lib.lq_abi_version()
        except (OSError, AttributeError) as e:
            why = f"cannot load the native CPU kernel library {path}: {e}"
        else:
            if version == ABI_VERSION:
                native = Native(lib, path)
                native.threads = native.use_threads(requested_threads())
                pf = requested_prefetch()
                if pf is not None:
                    native.prefetch = pf
                logger.info("llmquant CPU kernels: %s, %s threads (%s)", native.detected_isa, native.threads, path)
                return native, ""
            why = f"{path} has ABI version {version}, this llmquant expects {ABI_VERSION}: rebuild it"
    logger.warning("%s; quantized layers on the CPU fall back to the (slow) reference kernel", why)
    return None, why
