"""How the registry chooses the CPU kernel: priority over the reference, the LLMQUANT_KERNEL /
LLMQUANT_DISABLE_KERNELS switches, and the fallback (with one warning) when the native library is
missing."""
import logging
import os

import pytest
import torch

from llmquant.config import LayerQuant
from llmquant.kernels import NoKernelError, cpu_native, dequant_matmul_ref, get_kernel, select_kernel
from llmquant.kernels.registry import KernelSpec, env_switch
from llmquant.modules.quant_linear import QuantLinear
from llmquant.quantizers.rtn import quantize_weight_rtn

NATIVE, WHY = cpu_native.load()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native CPU library unavailable: {WHY}")


def spec(dtype=torch.float32, bits=4, device_type="cpu"):
    return KernelSpec(bits, 128, True, 256, 64, False, dtype, device_type)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("LLMQUANT_KERNEL", "LLMQUANT_DISABLE_KERNELS", "LLMQUANT_CPU_ISA", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_is_chosen_for_cpu_layers(dtype):
    assert select_kernel(spec(dtype)).name == "cpu"


def test_fp16_and_other_devices_fall_back_with_reasons(monkeypatch):
    assert select_kernel(spec(torch.float16)).name == "reference"
    monkeypatch.setenv("LLMQUANT_KERNEL", "cpu")
    with pytest.raises(NoKernelError, match="float16"):
        select_kernel(spec(torch.float16))
    with pytest.raises(NoKernelError, match="'cuda' is not the CPU"):
        select_kernel(spec(device_type="cuda"))


@needs_native
def test_env_switches(monkeypatch):
    monkeypatch.setenv("LLMQUANT_KERNEL", "reference")
    assert select_kernel(spec()).name == "reference"
    monkeypatch.delenv("LLMQUANT_KERNEL")
    monkeypatch.setenv("LLMQUANT_DISABLE_KERNELS", "triton, cpu")
    assert select_kernel(spec()).name == "reference"
    monkeypatch.setenv("LLMQUANT_DISABLE_KERNELS", "reference")
    assert select_kernel(spec()).name == "cpu"


@needs_native
def test_quant_linear_runs_on_cpu_kernel():
    torch.manual_seed(0)
    w = quantize_weight_rtn(torch.randn(48, 200), LayerQuant(4, 64, False))
    bias = torch.randn(48)
    mod = QuantLinear.from_packed(w, bias)
    x = torch.randn(2, 3, 200)
    y = mod(x)
    assert mod.kernel_for(torch.float32)[0].name == "cpu"
    torch.testing.assert_close(y, dequant_matmul_ref(x, w, bias), rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.fixture
def missing_library(monkeypatch):
    monkeypatch.setattr(cpu_native, "library_path", lambda: None)
    cpu_native.load.cache_clear()
    yield
    monkeypatch.undo()
    cpu_native.load.cache_clear()


def test_missing_library_falls_back_to_reference_with_one_warning(missing_library, caplog):
    torch.manual_seed(0)
    w = quantize_weight_rtn(torch.randn(16, 64), LayerQuant(4, 32, True))
    with caplog.at_level(logging.WARNING, logger="llmquant.kernels.cpu_native"):
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            assert select_kernel(w.spec(dtype)).name == "reference"
        mod = QuantLinear.from_packed(w, None)
        x = torch.randn(3, 64)
        torch.testing.assert_close(mod(x), dequant_matmul_ref(x, w))
    warnings = [r for r in caplog.records if r.name == "llmquant.kernels.cpu_native"]
    assert len(warnings) == 1 and "not built" in warnings[0].getMessage()
    ok, why = get_kernel("cpu").can_implement(w.spec(torch.float32))
    assert not ok and "not built" in why


def test_dynamic_int8_activations_pick_a_kernel_that_runs_them():
    """The Triton kernel refuses act_int8 by name; the CPU kernel and the reference (which emulates it)
    accept it, so a model asking for it never silently runs float activations."""
    from llmquant.kernels.triton_w4a16 import TritonKernel

    spec = KernelSpec(bits=4, group_size=128, sym=True, in_features=256, out_features=64, has_perm=False,
                      dtype=torch.float32, device_type="cuda", act_int8=True)
    ok, why = TritonKernel().can_implement(spec)
    assert not ok and "dynamic INT8 activations run on the CPU kernel" in why


def test_env_switch_follows_the_environment_as_it_changes(monkeypatch):
    """The kernels' switches are read on every call through env_switch (the fast lookup): it must see
    what os.environ and monkeypatch set and unset, not a value from earlier."""
    name = "LLMQUANT_TEST_ENV_SWITCH"
    monkeypatch.delenv(name, raising=False)
    assert env_switch(name) == ""
    monkeypatch.setenv(name, "  avx2 ")
    assert env_switch(name) == "avx2"
    os.environ[name] = "fma"
    assert env_switch(name) == "fma"
    del os.environ[name]
    assert env_switch(name) == ""
    monkeypatch.setenv("LLMQUANT_CPU_ISA", "no-such-isa")
    with pytest.raises(ValueError, match="no-such-isa"):
        cpu_native.requested_isa()
    monkeypatch.setenv("LLMQUANT_CPU_ISA", "scalar")
    assert cpu_native.requested_isa() == cpu_native.ISA_NAMES.index("scalar")
