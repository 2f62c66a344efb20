"""bf16 on the CPU: detection from the CPU flags, the override, and the policy that picks float32 unless bf16 is
native and measured faster (the real CPU's flags are not assumed: the tests force both ways)."""

from __future__ import annotations

import pytest
import torch

from prefixtune import runtime
from prefixtune.doctor import doctor_report
from prefixtune.runtime import BF16_ENV, cpu_bf16, cpu_info, cpu_precision, pick_cpu_dtype

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
"""


def test_cpu_info_reads_the_name_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    name, flags = cpu_info(str(path))
    assert name == "Intel(R) Xeon(R) Platinum 8480+" and {"amx_bf16", "avx512_bf16", "avx2"} <= flags
    assert cpu_info(str(tmp_path / "missing")) == ("unknown", set())


def test_detection_from_flags_and_the_override(monkeypatch):
    monkeypatch.delenv(BF16_ENV, raising=False)
    assert cpu_bf16({"avx2", "amx_bf16"}) == (True, "amx_bf16")
    native, why = cpu_bf16({"avx2", "fma"})
    assert not native and "amx_bf16" in why
    monkeypatch.setenv(BF16_ENV, "0")
    assert cpu_bf16({"amx_bf16"}) == (False, f"forced by {BF16_ENV}=0")
    monkeypatch.setenv(BF16_ENV, "1")
    assert cpu_bf16(set())[0]


def test_policy_picks_float32_without_bf16_and_never_measures(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda *a, **k: pytest.fail("measured without bf16"))
    chosen = cpu_precision(576, 1536, {"prefill": 256, "decode": 1})
    assert {phase: dtype for phase, (dtype, _) in chosen.items()} == {"prefill": torch.float32,
                                                                       "decode": torch.float32}
    assert "no bf16" in chosen["decode"][1]


def test_policy_picks_bf16_per_phase_where_measured_faster(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "1")
    measured = {256: 8.0, 1: 0.8}  # the AMX shape: big at many rows, slower at one
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda rows, hidden, out: measured[rows])
    chosen = cpu_precision(576, 1536, {"prefill": 256, "decode": 1})
    assert chosen["prefill"][0] == torch.bfloat16 and chosen["decode"][0] == torch.float32
    assert "8.00x" in chosen["prefill"][1]
    assert pick_cpu_dtype(True, None) == torch.float32  # not measured: float32
    assert pick_cpu_dtype(False, 9.0) == torch.float32


def test_bf16_micro_benchmark_runs_here():
    assert runtime.bf16_matmul_speedup(4, 64, 64, repeats=2) > 0


def test_doctor_names_the_cpu_and_its_bf16(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    row = next(r for r in doctor_report({"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2"})
               if r[0] == "cpu")
    assert f"no native bf16 (forced by {BF16_ENV}=0)" in row[1]
