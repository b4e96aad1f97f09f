"""``model.dtype: auto``: bf16 on GPUs that support it, fp16 on other GPUs; on the CPU bf16 only where it is native
(AVX512-BF16 or AMX, not capped by ONEDNN_MAX_CPU_ISA), else fp32; an explicit dtype is kept as given."""

from __future__ import annotations

import pytest
import torch

from core import model as m
from core.config import ModelArgs

CPU = torch.device("cpu")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set what torch reports of the CPU: ``cpu_flags(avx512_bf16=..., amx=...)``."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def set_flags(avx512_bf16: bool, amx: bool = False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_flags


@pytest.mark.parametrize("avx512_bf16, amx, native", [(True, False, True), (False, True, True),
                                                       (False, False, False)])
def test_native_bf16_from_the_cpu_flags(cpu_flags, avx512_bf16, amx, native):
    cpu_flags(avx512_bf16, amx)
    assert m.cpu_has_native_bf16() is native


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                         ("AVX512_CORE_AMX", True), ("", True)])
def test_an_isa_cap_below_bf16_means_emulated(cpu_flags, monkeypatch, cap, native):
    cpu_flags(True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert m.cpu_has_native_bf16() is native


def test_a_torch_without_the_checks_keeps_fp32(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert m.cpu_has_native_bf16() is False


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(m, "cpu_has_native_bf16", lambda: native)
    assert m.pick_dtype(ModelArgs(dtype="auto"), CPU) == expected


@pytest.mark.parametrize("bf16_gpu, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_gpu(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
    assert m.pick_dtype(ModelArgs(dtype="auto"), torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_is_kept(monkeypatch, name):
    monkeypatch.setattr(m, "cpu_has_native_bf16", lambda: True)
    assert m.pick_dtype(ModelArgs(dtype=name), CPU) == getattr(torch, name)

