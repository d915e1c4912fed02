"""The dataset card (pipeline/store/card.py) pinned where tests/test_dataset_card.py checks only what `datasets`
and `cache verify` see (mutation testing, docs/MUTATION.md): the whole card of one manifest byte for byte
against tests/golden/dataset_card.md (the card is a function of the manifest alone, and DVC hashes it, so any
byte that moves is a change to review), the code fence, the header parser, whose README counts as ours, the
atomic writer's keep/skip decisions, and `check_card`'s three messages word for word.

After an intended change to the card, review the new text and rewrite the golden file with
    .venv/bin/python -c "from tests.test_mut_card import MANIFEST; from pipeline.store.card import render_card; \
        open('tests/golden/dataset_card.md', 'w').write(render_card(MANIFEST))"
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.store.card import (CARD, MARKER, _fence, card_front_matter, check_card, front_matter, is_our_card,
                                 render_card, shard_names, write_dataset_card)

GOLDEN = Path(__file__).parent / "golden" / "dataset_card.md"

MANIFEST = {
    "fingerprint": "0123456789abcdef" + "f" * 48, "schema_version": 3, "n_samples": 943, "n_shards": 2,
    "hidden_size": 576, "h_dec_dtype": "float16", "tool_version": "0.9.1",
    "shards": [{"name": "part-00000-of-00002.parquet", "rows": 512}, {"name": "part-00001-of-00002.parquet"},
               {"rows": 3}, "junk"],
    "settings": {
        "k": 20, "mode": "first_token", "backend": "hf", "history_len": 50, "candidate_order": "shuffled",
        "seed": 7, "prepared_fingerprint": "p" * 64, "candidates_fingerprint": "c" * 64,
        "teacher": {"name": "SmolLM2-135M-Instruct", "revision": "abc123", "hidden_size": 576, "dtype": "bfloat16"},
        "identifiers": {"scheme": "letters", "labels": ["A", "B", "C"]},
        "template": "Rank these:\n```\n{candidates}\n```\nAnswer with ```` fences",
    },
}


def test_the_whole_card_is_the_golden_text():
    assert render_card(MANIFEST) == GOLDEN.read_text(encoding="utf-8")


def test_card_of_a_sparse_manifest_renders_its_missing_values_as_such():
    """A manifest without settings or teacher (a damaged or older one) still renders: nulls, not a crash."""
    text = render_card({"fingerprint": "ab", "shards": []})
    assert text.startswith(f"---\n{MARKER}\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                           "    path:\ndataset_info:\n")
    assert "  - name: h_dec\n    list: None\n    length: 0\n" in text
    assert "  teacher: null\n  teacher_revision: null\n  mode: null\n" in text
    assert "| teacher | `None` |" in text and "| identifiers | `None ()` |" in text
    assert "| hidden size | `None` |" in text and "\n# Teacher store ab\n" in text
    assert "The data is 0 zstd Parquet shard(s)" in text and "```text\n\n```" in text


def test_teacher_that_is_not_a_mapping_is_ignored():
    m = {**MANIFEST, "settings": {**MANIFEST["settings"], "teacher": "a string", "identifiers": ["A"]}}
    text = render_card(m)
    assert "  teacher: null\n" in front_matter(m) and "| teacher | `None` |" in text
    assert "| hidden size | `576` |" in text  # from the manifest when the teacher does not say
    assert "| identifiers | `None ()` |" in text


def test_shard_names_keep_only_named_entries_in_order():
    assert shard_names(MANIFEST) == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    assert shard_names({}) == []


@pytest.mark.parametrize("text, fence", [("", "```"), ("a `b` c", "```"), ("``` x", "````"), ("x ````` y ``", "``````"),
                                         ("``\n``", "```")])
def test_fence_is_longer_than_any_backtick_run(text, fence):
    assert _fence(text) == fence


def test_front_matter_parser():
    assert card_front_matter("---\na: 1\n---\nbody") == "---\na: 1\n---\n"
    assert card_front_matter("---\na: 1\n") is None  # never closed
    assert card_front_matter("x---\na\n---\n") is None  # not at the start
    assert card_front_matter("----\na\n---\n") is None
    assert card_front_matter("---\n---\nbody") == "---\n---\n"  # an empty header
    assert card_front_matter("---\n\n---\n") == "---\n\n---\n"
    head = front_matter(MANIFEST)
    assert card_front_matter(render_card(MANIFEST)) == head


def test_is_our_card(tmp_path: Path):
    p = tmp_path / CARD
    p.write_text(render_card(MANIFEST), encoding="utf-8")
    assert is_our_card(p)
    p.write_text(f"---\n{MARKER}\n", encoding="utf-8")
    assert is_our_card(p)
    p.write_text(f"--- \n{MARKER}\n", encoding="utf-8")
    assert not is_our_card(p)
    p.write_text(f"# notes\n---\n{MARKER}\n", encoding="utf-8")
    assert not is_our_card(p)
    p.write_bytes(b"\xff\xfe not utf-8")
    assert not is_our_card(p)
    assert not is_our_card(tmp_path / "absent.md")


def test_write_leaves_the_same_card_untouched_and_replaces_an_old_one(tmp_path: Path):
    path = write_dataset_card(tmp_path, MANIFEST)
    assert path == tmp_path / CARD and path.read_text(encoding="utf-8") == render_card(MANIFEST)
    os.utime(path, (1_000_000, 1_000_000))
    assert write_dataset_card(tmp_path, MANIFEST) == path and path.stat().st_mtime == 1_000_000  # not rewritten
    other = {**MANIFEST, "n_samples": 10}
    write_dataset_card(tmp_path, other)
    assert path.read_text(encoding="utf-8") == render_card(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD]  # no temporary file left


def test_write_never_replaces_a_persons_readme(tmp_path: Path):
    path = tmp_path / CARD
    path.write_text("# my notes\n", encoding="utf-8")
    assert write_dataset_card(tmp_path, MANIFEST) == path
    assert path.read_text(encoding="utf-8") == "# my notes\n"
    path.write_bytes(b"\xff\xfe binary")  # unreadable as text: not ours either
    write_dataset_card(tmp_path, MANIFEST)
    assert path.read_bytes() == b"\xff\xfe binary"


def test_check_card_messages(tmp_path: Path):
    assert check_card(tmp_path, MANIFEST) == []  # no card: a store from before cards
    write_dataset_card(tmp_path, MANIFEST)
    assert check_card(tmp_path, MANIFEST) == []
    path = tmp_path / CARD
    path.write_text(front_matter(MANIFEST) + "\nprose edited by hand\n", encoding="utf-8")
    assert check_card(tmp_path, MANIFEST) == []  # only the header is checked
    assert check_card(tmp_path, {**MANIFEST, "fingerprint": "0" * 64}) == [
        f"{CARD}: its front matter does not match the manifest (shards, features or fingerprint differ: a card of "
        f"another store?); rewrite it with `gedistill cache card {tmp_path}`"]
    for text in ("# my notes\n", "---\nfoo: 1\n---\n", f"---\n{MARKER}\nnever closed\n"):
        path.write_text(text, encoding="utf-8")
        assert check_card(tmp_path, MANIFEST) == [
            f"{CARD}: not a gedistill dataset card (no gedistill front matter), so `datasets.load_dataset` would not "
            f"read this store as its shards; move it away and run `gedistill cache card {tmp_path}`"]
    path.write_bytes(b"\xff\xfe binary")
    assert check_card(tmp_path, MANIFEST) == [
        f"{CARD}: unreadable (UnicodeDecodeError); rewrite it with `gedistill cache card {tmp_path}`"]


def test_front_matter_is_ascii_with_json_escapes():
    """The header stays ASCII whatever the teacher's name: `\\u` escapes, which YAML's double quotes read back."""
    m = {**MANIFEST, "settings": {**MANIFEST["settings"], "teacher": {"name": "modèle-ü"}}}
    head = front_matter(m)
    assert '  teacher: "mod\\u00e8le-\\u00fc"\n' in head and head.isascii()


def test_front_matter_ends_at_the_first_closing_line():
    """A horizontal rule (`---` on its own line) in the prose is not part of the header."""
    assert card_front_matter("---\na: 1\n---\nbody\n---\nmore\n") == "---\na: 1\n---\n"
    assert card_front_matter(render_card(MANIFEST) + "\n---\nnotes\n---\n") == front_matter(MANIFEST)


def test_hidden_size_comes_from_the_teacher_when_it_says():
    m = {**MANIFEST, "settings": {**MANIFEST["settings"], "teacher": {"name": "t", "hidden_size": 960}}}
    assert "| hidden size | `960` |" in render_card(m)
