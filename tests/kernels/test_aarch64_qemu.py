"""The AArch64 kernels (``neon``, ``neon_dotprod``: kernels/csrc/lq_neon.c) against the reference.

Nobody here has an ARM machine, so the library's C sources are cross-compiled (Debian's
``gcc-aarch64-linux-gnu``) together with a small C driver (``lq_harness.c``) into one static
AArch64 program, which runs under ``qemu-aarch64`` on the cases this test writes: the layers of
test_cpu_kernel.py (every layout and blocking boundary), fp32 and bf16 x, decode and batched M, the
integer GEMV (SDOT) in its fp32 and dynamic INT8 forms, two threads. Its outputs are compared here
with :func:`dequant_matmul_ref`, with test_cpu_kernel.py's tolerances; its dequantization must equal
the format's bit for bit. qemu checks correctness only: ARM speed is unmeasured.

Needs ``aarch64-linux-gnu-gcc`` and ``qemu-aarch64`` (``.ci/run`` installs them); without them the
test skips, unless ``LLMQUANT_REQUIRE_AARCH64=1`` (set by CI after installing them) makes that a
failure.
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from llmquant.formats.packing import dequantize_packed
from llmquant.kernels import act_int8, dequant_matmul_ref
from llmquant.kernels.cpu_layout import repack
from llmquant.kernels.cpu_native import ISA_NAMES

from .test_cpu_kernel import LAYERS, check_fp32, make_packed, rel_mean_abs_err

CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
CSRC = Path(__file__).resolve().parents[2] / "kernels" / "csrc"
SOURCES = ["lq_api.c", "lq_driver.c", "lq_pool.c", "lq_scalar.c", "lq_neon.c"]
MAGIC = 0x4C51484E
FLAG_NO_INT, FLAG_A8 = 2, 4  # LQ_FLAG_* in lq_api.c


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    if not (CC and QEMU):
        why = "needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt: gcc-aarch64-linux-gnu qemu-user)"
        if os.environ.get("LLMQUANT_REQUIRE_AARCH64") == "1":
            pytest.fail(f"LLMQUANT_REQUIRE_AARCH64=1 but the cross toolchain is missing: {why}")
        pytest.skip(why)
    exe = tmp_path_factory.mktemp("aarch64") / "lq_harness"
    cmd = [CC, "-O3", "-std=gnu11", "-fvisibility=hidden", "-pthread", "-Wall", "-Werror", "-static",
           f"-I{CSRC}", *(str(CSRC / s) for s in SOURCES), str(Path(__file__).with_name("lq_harness.c")),
           "-lm", "-o", str(exe)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def run(exe: Path, cases: list[Path], cpu: str = "max") -> str:
    """Runs the cases under qemu on the given CPU model; returns the detected instruction set."""
    r = subprocess.run([QEMU, "-cpu", cpu, str(exe), *map(str, cases)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[1]


def write_case(path: Path, lay, x: torch.Tensor, bias, isa: str, flags: int = 0, threads: int = 1) -> Path:
    m, k = x.shape
    head = [MAGIC, lay.out_features, k, lay.group_size, lay.bits, lay.zero_point, lay.zeros is not None, m,
            int(x.dtype == torch.bfloat16), ISA_NAMES.index(isa), flags, threads, lay.qdata.numel(),
            lay.scales.numel(), bias is not None, 0]  # fmt: skip
    parts = [np.asarray(head, dtype="<i8").tobytes(), lay.qdata.numpy().tobytes(), lay.scales.view(torch.int16).numpy().tobytes()]
    if lay.zeros is not None:
        parts.append(lay.zeros.numpy().tobytes())
    xs = x if lay.perm is None else x.index_select(1, lay.perm)
    parts.append(xs.contiguous().view(torch.int16 if x.dtype == torch.bfloat16 else torch.float32).numpy().tobytes())
    if bias is not None:
        parts.append(bias.to(torch.float32).numpy().tobytes())
    path.write_bytes(b"".join(parts))
    return path


def read_out(path: Path, m: int, n: int, k: int, dtype: torch.dtype):
    raw = Path(f"{path}.out").read_bytes()
    es = 2 if dtype == torch.bfloat16 else 4
    rc1 = int(np.frombuffer(raw[:8], "<i8")[0])
    y = torch.frombuffer(bytearray(raw[8 : 8 + m * n * es]), dtype=torch.int16 if es == 2 else torch.float32)
    y = y.view(torch.bfloat16) if es == 2 else y
    at = 8 + m * n * es
    rc2 = int(np.frombuffer(raw[at : at + 8], "<i8")[0])
    wf = torch.frombuffer(bytearray(raw[at + 8 :]), dtype=torch.float32)
    assert wf.numel() == n * k
    return rc1, y.view(m, n), rc2, wf.view(n, k)


def test_neon_kernels_match_reference_under_qemu(harness, tmp_path):
    g = torch.Generator().manual_seed(0)
    cases = []  # (path, spec, packed weight, x, bias, isa, flags)
    for i, spec in enumerate(LAYERS):
        w = make_packed(*spec, seed=i)
        lay = repack(w)
        bias = torch.randn(w.out_features, generator=g)
        for isa in ("neon", "neon_dotprod"):
            runs = [(m, torch.float32, 0, 1) for m in (1, 3, 7, 33)] + [
                (1, torch.float32, FLAG_NO_INT, 1), (5, torch.float32, FLAG_A8, 1), (1, torch.float32, FLAG_A8, 1),
                (2, torch.bfloat16, 0, 1), (40, torch.bfloat16, 0, 2), (64, torch.float32, 0, 2),
            ]  # fmt: skip
            for j, (m, dtype, flags, threads) in enumerate(runs):
                x = torch.randn(m, w.in_features, generator=g).to(dtype)
                b = bias if j % 2 else None
                p = write_case(tmp_path / f"c{len(cases)}", lay, x, b, isa, flags, threads)
                cases.append((p, spec, w, x, b, isa, flags))
    assert run(harness, [c[0] for c in cases]) == "neon_dotprod"
    for p, spec, w, x, b, isa, flags in cases:
        m, n, k = x.shape[0], w.out_features, w.in_features
        rc1, y, rc2, wf = read_out(p, m, n, k, x.dtype)
        what = (spec, isa, m, x.dtype, flags)
        assert rc1 == 0 and rc2 == 0, what
        ref_w = dequantize_packed(w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size, in_features=k)
        assert torch.equal(wf, ref_w), what
        if x.dtype == torch.bfloat16:
            ref = dequant_matmul_ref(x.float(), w, b)
            assert rel_mean_abs_err(y, ref) < 1e-2, what
            continue
        # dynamic INT8 activations need SDOT; the plain NEON table computes such a call exactly
        a8 = bool(flags & FLAG_A8) and isa == "neon_dotprod" and act_int8.applies(w.bits, w.group_size, k)
        ref = dequant_matmul_ref(x, w, b, act_int8=a8)
        check_fp32(y, ref)
        if a8:  # and it really took the INT8 path: not the exact product
            assert not torch.allclose(y, dequant_matmul_ref(x, w, b), rtol=1e-6, atol=0), what


def test_runtime_detection_and_errors_under_qemu(harness, tmp_path):
    """A CPU without SDOT (Cortex-A53) runs the plain NEON table even when neon_dotprod is asked for;
    invalid arguments come back as LQ_EINVAL with a message, not a crash."""
    w = make_packed(4, 128, True, False, 12, 256, seed=1)
    lay = repack(w)
    x = torch.randn(1, 256)
    ok = write_case(tmp_path / "ok", lay, x, None, "neon_dotprod")
    assert run(harness, [ok], cpu="cortex-a53") == "neon"
    rc1, y, rc2, _ = read_out(ok, 1, 12, 256, torch.float32)
    assert rc1 == 0 and rc2 == 0
    check_fp32(y, dequant_matmul_ref(x, w))
    # an x86 cap on ARM means scalar: still correct
    x86 = write_case(tmp_path / "x86", lay, x, None, "avx512")
    run(harness, [x86])
    rc1, y, _, _ = read_out(x86, 1, 12, 256, torch.float32)
    assert rc1 == 0
    check_fp32(y, dequant_matmul_ref(x, w))
    bad = tmp_path / "bad"
    raw = bytearray(write_case(bad, lay, x, None, "neon").read_bytes())
    raw[4 * 8 : 5 * 8] = np.asarray([5], "<i8").tobytes()  # bits = 5
    bad.write_bytes(bytes(raw))
    r = subprocess.run([QEMU, str(harness), str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "layout bits must be 2, 3, 4 or 8, got 5" in r.stderr
    assert read_out(bad, 1, 12, 256, torch.float32)[0] == -1
