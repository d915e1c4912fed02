"""`--dtype auto` decided by what the machine runs fast (CPU flags, else a cached matmul probe), never
by torch's capability string and never float16 on a CPU; one decision for both backends."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.errors import UsageError
from pipeline.teacher import dtype_choice
from pipeline.teacher.dtype_choice import choose_dtype, cpu_choice

CPU = torch.device("cpu")
EPYC = ("AMD EPYC 9R14 96-Core Processor", frozenset({"avx2", "avx512f", "avx512_bf16"}))
XEON_AMX = ("Intel(R) Xeon(R) Platinum 8488C", frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}))
OLD_XEON = ("Intel(R) Xeon(R) CPU E5-2686 v4", frozenset({"avx2", "fma"}))


def no_probe():
    raise AssertionError("the probe must not run when the flags decide")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Pretend to be a given CPU; count probe runs; the probe cache lives in tmp_path."""
    monkeypatch.setattr(dtype_choice, "probe_cache_dir", lambda: tmp_path)
    # torch's capability string says AVX2 on the EPYC that has avx512_bf16 (DESIGN.md point 9)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    state = {"probes": 0, "result": {"bfloat16": 100.0, "float32": 200.0}}

    def probe(*a, **k):
        state["probes"] += 1
        return dict(state["result"])

    def use(info):
        monkeypatch.setattr(dtype_choice, "cpu_info", lambda: info)

    monkeypatch.setattr(dtype_choice, "matmul_probe", probe)
    state["use"] = use
    return state


def test_bf16_flags_choose_bf16_even_when_torch_says_avx2(machine, caplog):
    """Fails if `auto` trusts `get_cpu_capability()`: the old rule chose float32 on this EPYC (0.81
    instead of 1.72 samples/s)."""
    machine["use"](EPYC)
    with caplog.at_level(logging.INFO, logger="pipeline.teacher.dtype_choice"):
        choice = choose_dtype("auto", CPU)
    assert choice.dtype == torch.bfloat16 and "avx512_bf16" in choice.reason
    assert machine["probes"] == 0  # flags decide without timing anything
    assert "compute dtype bfloat16 on cpu" in caplog.text and "avx512_bf16" in caplog.text  # choice and reason logged
    machine["use"](XEON_AMX)
    assert choose_dtype("auto", CPU).dtype == torch.bfloat16


def test_without_flags_the_probe_decides_once_per_machine(machine, tmp_path):
    """Fails if the probe's verdict is ignored, or if it is rerun on every start instead of cached."""
    machine["use"](OLD_XEON)
    assert choose_dtype("auto", CPU).dtype == torch.float32  # probe: bf16 100 < fp32 200 GFLOP/s
    assert machine["probes"] == 1 and (tmp_path / dtype_choice.PROBE_FILE).is_file()
    machine["result"] = {"bfloat16": 900.0, "float32": 200.0}  # a new probe would say bf16 ...
    assert choose_dtype("auto", CPU).dtype == torch.float32  # ... but the cached one is used
    assert machine["probes"] == 1
    other = ("ARM Neoverse-V1", frozenset({"fp", "asimd", "bf16"}))  # another machine: its own probe
    machine["use"](other)
    choice = choose_dtype("auto", CPU)
    assert machine["probes"] == 2 and choice.dtype == torch.bfloat16 and "900" in choice.reason


@pytest.mark.parametrize("flags, probe, expected", [
    ({"avx512_bf16"}, None, torch.bfloat16),
    ({"amx_bf16"}, {"bfloat16": 1.0, "float32": 1000.0}, torch.bfloat16),  # native flags win
    (set(), {"bfloat16": 300.0, "float32": 200.0}, torch.bfloat16),
    (set(), {"bfloat16": 220.0, "float32": 200.0}, torch.float32),  # within the margin: not worth bf16
    (set(), {"bfloat16": 50.0, "float32": 200.0}, torch.float32),
    (set(), None, torch.float32),
])
def test_cpu_decision_table(flags, probe, expected):
    """Fails if the pure decision mixes up the flags or the probe comparison."""
    assert cpu_choice(frozenset(flags), probe).dtype == expected


def test_never_float16_on_a_cpu(machine):
    """Fails if a CPU run can end up in float16 (vLLM's own auto did: 10.8 s per prompt)."""
    for info in (EPYC, OLD_XEON):
        machine["use"](info)
        assert choose_dtype("auto", CPU).dtype in (torch.bfloat16, torch.float32)
    with pytest.raises(UsageError, match="float16 on a CPU.*bfloat16, float32 or auto"):
        choose_dtype("float16", CPU)
    assert choose_dtype("float32", CPU).dtype == torch.float32
    with pytest.raises(UsageError, match="unknown dtype"):
        choose_dtype("int8", CPU)


def test_a_corrupt_probe_cache_is_replaced(machine, tmp_path):
    machine["use"](OLD_XEON)
    (tmp_path / dtype_choice.PROBE_FILE).write_text("{not json")
    assert choose_dtype("auto", CPU).dtype == torch.float32 and machine["probes"] == 1


def test_cpu_info_reads_this_machine():
    model, flags = dtype_choice.cpu_info()
    assert model
    if Path("/proc/cpuinfo").is_file() and "flags" in Path("/proc/cpuinfo").read_text():
        assert flags  # x86 Linux: the flags line was found


@pytest.mark.teacher
def test_vllm_backend_passes_the_shared_choice_never_auto(machine, monkeypatch):
    """Fails if the vLLM backend hands `auto` to vLLM (which picks float16 on a CPU) instead of the
    shared decision. vLLM itself is faked: only the dtype its engines would be given matters here."""
    pytest.importorskip("transformers")
    from pipeline.teacher import vllm_backend
    from pipeline.teacher.convert import resolve_teacher
    from pipeline.teacher.vllm_engine import engine_kwargs

    config = types.ModuleType("vllm.config")
    config.PoolerConfig = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setattr(vllm_backend, "prepare_environment", lambda settings: {})  # leave os.environ alone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    location = resolve_teacher("embedded").location
    for info, expected in ((EPYC, "bfloat16"), (OLD_XEON, "float32")):
        machine["use"](info)
        teacher = vllm_backend.VLLMTeacher(vllm_backend.VLLMConfig(location, dtype="auto"))
        for kind in ("pool", "generate"):
            assert engine_kwargs(teacher.engines.settings, kind, 512)["dtype"] == expected
        assert teacher.dtype_name == expected
    with pytest.raises(UsageError, match="float16 on a CPU"):
        vllm_backend.VLLMTeacher(vllm_backend.VLLMConfig(location, dtype="float16"))
