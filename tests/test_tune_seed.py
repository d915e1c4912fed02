"""teacher-tune through `run_tune` on the real embedded teacher: a run is a function of its settings (the LoRA
initialisation follows the run's seed, not the process's random state), and on a CPU the kernel caches are
bounded before the first oneDNN kernel, as in teacher-dump."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.test_teacher_tune import tiny_tune_inputs  # noqa: E402,F401  (the fixture: prepared data and a retriever)


@pytest.mark.teacher
@pytest.mark.slow
def test_run_tune_depends_on_its_seed_not_on_the_process_random_state(tiny_tune_inputs, tmp_path, monkeypatch):
    """Two bf16 runs with the same settings in one process, torch's generator moved on in between (as the dtype
    probe moves it where the CPU flags do not decide): everything teacher-tune writes must be the same (losses,
    zero-shot and tuned metrics, the merged weights' hash). Fails if LoRA's A matrices are drawn from the
    process's random state (measured: the second optimizer step's loss differed in its 3rd-4th decimal), or if
    run_tune reaches choose_dtype (whose probe runs the first oneDNN kernels) before bounding the caches."""
    from pipeline.teacher import dtype_choice, heap
    from pipeline.teacher.tune import TuneConfig
    from pipeline.teacher.tune_run import TuneRunConfig, run_tune

    prepared, student, _ = tiny_tune_inputs
    cfg = TuneRunConfig(k=4, history_len=3, holdout_fraction=0.34, n_boot=50, dtype="bfloat16",
                        tune=TuneConfig(lr=1e-3, batch_size=4, max_samples=8, top_layers=2, checkpoint_every=100,
                                        target_modules=("q_proj", "v_proj", "down_proj")))
    calls: list[str] = []
    real_bound, real_choose = heap.bound_kernel_caches, dtype_choice.choose_dtype
    monkeypatch.setattr(heap, "bound_kernel_caches", lambda *a: calls.append(f"caches {a}") or real_bound(*a))
    monkeypatch.setattr(dtype_choice, "choose_dtype", lambda *a, **k: calls.append("dtype") or real_choose(*a, **k))

    first = run_tune(cfg, prepared, student, tmp_path / "first")
    assert calls == ["caches (32,)", "dtype"]  # a training step's capacity, not teacher-dump's 4 (heap.py)
    torch.rand(1000)  # the process's generator is elsewhere now
    second = run_tune(cfg, prepared, student, tmp_path / "second")
    assert first["dtype"] == second["dtype"] == "bfloat16"
    assert first["training"]["steps"] == 2 and len(first["training"]["loss_first"]) == 2
    assert first["training"] == second["training"]
    assert first["evaluation"] == second["evaluation"]
    assert first["teacher"]["merged_weights_sha256"] == second["teacher"]["merged_weights_sha256"]
