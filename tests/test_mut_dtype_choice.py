"""`--dtype auto`'s parts one by one (docs/MUTATION.md: test_dtype_choice.py killed 49% of this module's mutants;
the reading of /proc/cpuinfo, the probe's arithmetic, the probe cache's file and every reason a user reads in the
log were unchecked): what is read from cpuinfo texts of several machines, what the probe measures, what the
cache file holds and survives, and the exact decision and reason for each device and request."""

from __future__ import annotations

import hashlib
import json
import logging
import platform

import pytest
import torch

from pipeline.errors import UsageError
from pipeline.teacher import dtype_choice
from pipeline.teacher.dtype_choice import DtypeChoice, choose_dtype, cpu_choice, cpu_info

CPU = torch.device("cpu")
X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse2 avx2 fma
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: another model
flags\t\t: fpu avx512_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd bf16 sve
CPU implementer\t: 0x41
"""


def test_cpu_info_reads_the_first_cpus_model_and_flags(tmp_path, monkeypatch):
    f = tmp_path / "cpuinfo"
    f.write_text(X86, encoding="utf-8")
    assert cpu_info(f) == ("AMD EPYC 7B13 64-Core Processor", frozenset({"fpu", "sse2", "avx2", "fma"}))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    f.write_text(ARM, encoding="utf-8")  # ARM: "Features", and no model line -> the machine's architecture
    assert cpu_info(f) == ("aarch64", frozenset({"fp", "asimd", "bf16", "sve"}))
    f.write_text("cpu model\t: Loongson-3A5000: 2.5 GHz\nfeatures\t: lsx lasx\n", encoding="utf-8")
    assert cpu_info(f) == ("Loongson-3A5000: 2.5 GHz", frozenset({"lsx", "lasx"}))  # a colon inside a value
    f.write_bytes(b"model name\t: caf\xe9 CPU\nflags\t: avx2\n")  # not UTF-8: replaced, not a crash
    assert cpu_info(f) == ("caf\ufffd CPU", frozenset({"avx2"}))


def test_cpu_info_without_the_file_names_the_processor_or_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(platform, "processor", lambda: "Intel64 Family 6")
    assert cpu_info(tmp_path / "missing") == ("Intel64 Family 6", frozenset())
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_info(tmp_path / "missing") == ("x86_64", frozenset())


def test_the_probe_times_each_dtype_and_reports_its_best_run(monkeypatch):
    """2 n^3 FLOP over the fastest of `reps` timed runs, after one untimed warm-up, for bf16 and fp32 matrices."""
    calls = []
    real_mm = torch.mm

    def mm(a, b):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b)

    ticks = iter(range(10_000))
    monkeypatch.setattr(dtype_choice.time, "perf_counter", lambda: _clock(next(ticks)))
    monkeypatch.setattr(dtype_choice.torch, "mm", mm)
    got = dtype_choice.matmul_probe(n=8, reps=3)
    assert list(got) == ["bfloat16", "float32"]
    # the runs of each dtype last 3, 1 and 2 units (see _clock): the best is 1 unit
    assert got == {"bfloat16": 2 * 8**3 / 2.0**-10 / 1e9, "float32": 2 * 8**3 / 2.0**-10 / 1e9}
    assert calls == [(torch.bfloat16, torch.bfloat16, (8, 8), (8, 8))] * 4 + [(torch.float32, torch.float32, (8, 8), (8, 8))] * 4


def _clock(t: int) -> float:
    """perf_counter's t-th reading: pairs (start, stop) of runs lasting 3, 1, 2 units, then again 3, 1, 2 units;
    a unit is 2**-10 s and run r starts at 8 r s, so that stop - start is the length exactly."""
    run, end = divmod(t, 2)
    return run * 8.0 + end * {0: 3, 1: 1, 2: 2}[run % 3] * 2.0**-10


def test_the_real_probe_measures_both_dtypes():
    got = dtype_choice.matmul_probe(n=32, reps=2)
    assert set(got) == {"bfloat16", "float32"} and all(v > 0 and v != float("inf") for v in got.values())


def test_the_machine_key_is_model_flags_architecture_and_torch():
    text = f"EPYC|avx2 fma|{platform.machine()}|torch {torch.__version__}"
    assert dtype_choice._machine_key("EPYC", frozenset({"fma", "avx2"})) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_the_probe_cache_file_keeps_every_machines_result(tmp_path, monkeypatch, caplog):
    results = iter([{"bfloat16": 1.0, "float32": 2.0}, {"bfloat16": 3.0, "float32": 4.0}])
    monkeypatch.setattr(dtype_choice, "matmul_probe", lambda: next(results))
    cache = tmp_path / "not" / "yet"  # made, parents and all
    assert dtype_choice._cached_probe("k1", cache) == {"bfloat16": 1.0, "float32": 2.0}
    assert dtype_choice._cached_probe("k2", cache) == {"bfloat16": 3.0, "float32": 4.0}
    assert dtype_choice._cached_probe("k1", cache) == {"bfloat16": 1.0, "float32": 2.0}  # cached: no third probe
    text = (cache / dtype_choice.PROBE_FILE).read_text(encoding="utf-8")
    assert text == json.dumps({"k1": {"bfloat16": 1.0, "float32": 2.0}, "k2": {"bfloat16": 3.0, "float32": 4.0}}, indent=1)
    assert [p.name for p in cache.iterdir()] == [dtype_choice.PROBE_FILE]  # no temporary file left


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', '{"k1": [1, 2]}', "{not json"])
def test_a_probe_cache_that_is_not_a_mapping_of_results_is_replaced(tmp_path, monkeypatch, content):
    (tmp_path / dtype_choice.PROBE_FILE).write_text(content, encoding="utf-8")
    monkeypatch.setattr(dtype_choice, "matmul_probe", lambda: {"bfloat16": 5.0, "float32": 6.0})
    assert dtype_choice._cached_probe("k1", tmp_path) == {"bfloat16": 5.0, "float32": 6.0}
    assert json.loads((tmp_path / dtype_choice.PROBE_FILE).read_text(encoding="utf-8")) == {
        "k1": {"bfloat16": 5.0, "float32": 6.0}}


def test_a_probe_cache_other_machines_wrote_is_kept(tmp_path, monkeypatch):
    other = {"k0": {"bfloat16": 7.0, "float32": 8.0}, "comment": "kept as it is"}
    (tmp_path / dtype_choice.PROBE_FILE).write_text(json.dumps(other), encoding="utf-8")
    monkeypatch.setattr(dtype_choice, "matmul_probe", lambda: {"bfloat16": 5.0, "float32": 6.0})
    dtype_choice._cached_probe("k1", tmp_path)
    assert json.loads((tmp_path / dtype_choice.PROBE_FILE).read_text(encoding="utf-8")) == {
        **other, "k1": {"bfloat16": 5.0, "float32": 6.0}}


def test_an_unwritable_probe_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    cache = tmp_path / "a-file" / "cache"  # cannot be made (works as root too, unlike a read-only directory)
    monkeypatch.setattr(dtype_choice, "matmul_probe", lambda: {"bfloat16": 5.0, "float32": 6.0})
    with caplog.at_level(logging.WARNING, logger="pipeline.teacher.dtype_choice"):
        assert dtype_choice._cached_probe("k1", cache) == {"bfloat16": 5.0, "float32": 6.0}
    [record] = caplog.records
    assert record.getMessage().startswith(f"could not cache the dtype probe in {cache / dtype_choice.PROBE_FILE}: ")
    assert "Not a directory" in record.getMessage()


def test_the_cpu_decisions_reasons():
    assert cpu_choice(frozenset({"amx_bf16", "avx512_bf16", "avx2"}), None) == DtypeChoice(
        torch.bfloat16, "the CPU flags list amx_bf16, avx512_bf16 (native bf16 dot products)")
    assert cpu_choice(frozenset({"avx2"}), None) == DtypeChoice(torch.float32, "no native bf16 flags and no probe result")
    assert cpu_choice(frozenset(), {"bfloat16": 300.4, "float32": 200.0}) == DtypeChoice(
        torch.bfloat16, "no bf16 flags, but a matmul probe ran bf16 at 300 GFLOP/s against fp32 at 200")
    assert cpu_choice(frozenset(), {"bfloat16": 1.0, "float32": 143.0}) == DtypeChoice(
        torch.float32, "no native bf16 flags; a matmul probe ran bf16 at 1 GFLOP/s against fp32 at 143")
    # the margin: bf16 must run at least 1.15x fp32's speed
    at_margin = dtype_choice.PROBE_MARGIN * 100.0
    assert dtype_choice.PROBE_MARGIN == 1.15
    assert cpu_choice(frozenset(), {"bfloat16": at_margin, "float32": 100.0}).dtype == torch.bfloat16
    assert cpu_choice(frozenset(), {"bfloat16": at_margin * 0.999, "float32": 100.0}).dtype == torch.float32


def test_auto_on_a_cpu_probes_per_model_and_logs_the_decision_with_the_model(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(dtype_choice, "probe_cache_dir", lambda: tmp_path)
    probes = []
    monkeypatch.setattr(dtype_choice, "matmul_probe", lambda: probes.append(1) or {"bfloat16": 9.0, "float32": 90.0})
    for model in ("CPU A", "CPU B"):  # same flags, another model: a probe of its own
        monkeypatch.setattr(dtype_choice, "cpu_info", lambda model=model: (model, frozenset({"avx2"})))
        with caplog.at_level(logging.INFO, logger="pipeline.teacher.dtype_choice"):
            choice = choose_dtype("auto", CPU)
        assert choice == DtypeChoice(torch.float32, "no native bf16 flags; a matmul probe ran bf16 at 9 GFLOP/s "
                                                    f"against fp32 at 90; CPU {model!r}")
        assert caplog.records[-1].getMessage() == f"compute dtype float32 on cpu: {choice.reason}"
    assert len(probes) == 2


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_an_asked_for_dtype_is_used_as_asked(name, dtype, monkeypatch, caplog):
    monkeypatch.setattr(dtype_choice, "cpu_info", lambda: pytest.fail("an explicit dtype reads no CPU facts"))
    with caplog.at_level(logging.INFO, logger="pipeline.teacher.dtype_choice"):
        assert choose_dtype(name, CPU) == DtypeChoice(dtype, "asked for with --dtype")
    assert caplog.records[-1].getMessage() == f"compute dtype {name} on cpu: asked for with --dtype"


@pytest.mark.parametrize("device, bf16, expected, reason", [
    ("cuda", True, torch.bfloat16, "cuda supports bfloat16"),
    ("cuda", False, torch.float16, "cuda lacks bfloat16"),
    ("mps", True, torch.float16, "mps lacks bfloat16"),  # only CUDA's bf16 support is asked about
])
def test_auto_on_an_accelerator(device, bf16, expected, reason, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(dtype_choice, "cpu_info", lambda: pytest.fail("an accelerator reads no CPU facts"))
    assert choose_dtype("auto", torch.device(device)) == DtypeChoice(expected, reason)
    assert choose_dtype("float16", torch.device(device)) == DtypeChoice(torch.float16, "asked for with --dtype")


def test_the_refusals_say_what_to_use():
    with pytest.raises(UsageError) as e:
        choose_dtype("float16", CPU)
    assert str(e.value) == ("--dtype float16 on a CPU runs on a slow fallback path (no fast fp16 kernels); "
                            "use --dtype bfloat16, float32 or auto")
    with pytest.raises(UsageError) as e:
        choose_dtype("fp8", CPU)
    assert str(e.value) == "unknown dtype 'fp8'; choose auto, bfloat16, float32 or float16"
    assert DtypeChoice(torch.bfloat16, "").name == "bfloat16"
