"""dvc.yaml against the code: every stage lists the project modules (and package data) its command runs,
and two clean clones running `dvc repro` on a tiny profile write identical dvc.lock files."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The file of a project module (`pipeline.x`, `stages.y`, a package's __init__), else None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module an import statement names, anywhere in the file: function bodies included (stage one
    imports its LLM backends lazily). `from a import b` names `a` and `a.b` (b may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    return names | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}


def _data_files(tree: ast.AST) -> set[Path]:
    """Package data a module reads: string constants naming a file inside a project package,
    e.g. `resources.files("pipeline").joinpath("templates/rank_prompt.txt")`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value \
                and "\n" not in node.value and len(node.value) < 200:
            for pkg in PACKAGES:
                p = ROOT / pkg / node.value
                if p.is_file() and p.suffix != ".py":
                    found.add(p)
    return found


@cache
def reached(root_module: str) -> frozenset[Path]:
    """Project files the module runs, transitively: its imports' files and the package data they read.
    Empty files (an empty __init__.py) hold no code and are left out; give one code and it counts."""
    seen: set[Path] = set()
    todo = [root_module]
    names_done: set[str] = set()
    while todo:
        name = todo.pop()
        if name in names_done:
            continue
        names_done.add(name)
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        todo.extend(_imported_names(tree, package))
        seen.update(_data_files(tree))
    return frozenset(p for p in seen if p.stat().st_size > 0)


def command_modules() -> dict[str, str]:
    """`gedistill` command name -> module of the function behind it, read from stages/cli.py:
    `app.command("prepare")(prepare)` with `from stages.prepare import prepare`."""
    tree = ast.parse((ROOT / "stages" / "cli.py").read_text(encoding="utf-8"))
    origin = {a.asname or a.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              for a in node.names}
    out = {}
    for node in ast.walk(tree):
        # app.command("name")(func) and app.add_typer(sub_app, name="cache")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Call) \
                and getattr(node.func.func, "attr", None) == "command" and node.func.args:
            out[node.func.args[0].value] = origin[node.args[0].id]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_typer":
            name = next(k.value.value for k in node.keywords if k.arg == "name")
            out[name] = origin[node.args[0].id]
    return out


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps_missing(stage: dict, commands: dict[str, str]) -> list[str]:
    """Project files the stage's command runs that no entry of its `deps` covers (a folder covers its files)."""
    words = stage["cmd"].split()
    assert words[0] == "gedistill", f"cmd does not run gedistill: {stage['cmd'][:60]}"
    deps = [ROOT / d for d in stage.get("deps", [])]
    files = reached(commands[words[1]])
    return sorted(str(f.relative_to(ROOT)) for f in files
                  if not any(f == d or d in f.parents for d in deps))


def test_every_stage_lists_the_modules_its_command_imports():
    """Fails if a stage's command imports a project module (directly, through another module, or inside a
    function) or reads package data that the stage's `deps` do not list: editing it would not rerun the
    stage, and `dvc repro` would report stale outputs as current. On the dvc.yaml before this test, distill
    missed losses_distill/teacher_stream/store/candidates/checkpoint/..., evaluate and retrieve several."""
    commands = command_modules()
    missing = {name: m for name, st in dvc_stages().items() if (m := code_deps_missing(st, commands))}
    assert not missing, f"add these to the stages' deps in dvc.yaml: {missing}"


def test_stage_code_deps_are_exactly_what_runs():
    """Fails if a stage lists a code file that does not exist or that its command never imports: a stale
    entry (a renamed module) would otherwise go unnoticed, and an unused one reruns the stage for nothing."""
    commands = command_modules()
    problems = {}
    for name, st in dvc_stages().items():
        files = reached(commands[st["cmd"].split()[1]])
        for d in st.get("deps", []):
            p = ROOT / d
            if d.startswith("data/"):
                continue  # stage outputs
            if not p.exists():
                problems.setdefault(name, []).append(f"{d} does not exist")
            elif not any(f == p or p in f.parents for f in files):
                problems.setdefault(name, []).append(f"{d} is never imported or read")
    assert not problems, problems


def test_dependency_walk_sees_lazy_imports_and_package_data():
    """Fails if the walk misses imports inside functions (teacher-dump loads its backends lazily) or the
    prompt template read through importlib.resources: the dep test above would then pass vacuously."""
    files = {str(p.relative_to(ROOT)) for p in reached("stages.teacher_dump")}
    assert {"pipeline/teacher/hf_backend.py", "pipeline/teacher/convert.py",
            "pipeline/templates/rank_prompt.txt", "pipeline/store.py", "pipeline/__init__.py"} <= files
    assert command_modules()["student-train"] == "stages.train_student"


def _png_text_chunks(data: bytes) -> list[bytes]:
    import struct

    chunks, i = [], 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind in (b"tEXt", b"iTXt", b"zTXt", b"tIME"):
            chunks.append(kind + b":" + data[i + 8:i + 8 + n])
        i += 12 + n
    return chunks


def test_plots_carry_no_host_or_version_metadata(tmp_path: Path):
    """Fails if the PNGs that evaluate writes (a DVC output) carry a text or time chunk: matplotlib's default
    writes `Software: Matplotlib version...`, so the plots' hash changed with the plotting library's version
    on otherwise identical runs."""
    import numpy as np

    from pipeline.plots import plot_teacher

    path = plot_teacher(np.array([3, 1, 0]), {"teacher": np.array([1, 2, 1])}, tmp_path / "t.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert _png_text_chunks(data) == []
