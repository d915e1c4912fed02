"""The input adapters (pipeline/data/sources.py), pinned where tests/test_prepare.py reaches them only through
`prepare` (mutation testing, docs/MUTATION.md): RecBole atomic files and CSVs read as text (ids such as "007"
kept, quotes not special), every error message with the file, the column and what to do, item text joined as
documented, and the embedded MovieLens-100K found in the installed recbole wheel.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.data import sources
from pipeline.data.sources import (Columns, embedded_items_frame, embedded_ml100k, package_dir, read_interactions,
                                   read_items)
from pipeline.errors import UsageError

ATOMIC = 'user_id:token\titem_id:token\ttimestamp:float\n007\t"A, b"\t3\n007\t0042\t1.5\n8\tx\t2\n'


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- reading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["i.inter", "i.tsv", "I.INTER", "i.Tsv"])
def test_atomic_files_are_tab_separated_text_with_typed_headers(tmp_path, name):
    df = read_interactions(write(tmp_path / name, ATOMIC), Columns())
    assert df.columns == ["row", "user", "item", "ts"]
    assert df["user"].to_list() == ["007", "007", "8"]  # text: leading zeros kept, never inferred as numbers
    assert df["item"].to_list() == ['"A, b"', "0042", "x"]  # no quoting in atomic files: the quotes are data
    assert df["ts"].to_list() == [3.0, 1.5, 2.0] and df["row"].to_list() == [0, 1, 2]


def test_the_item_suffix_is_an_atomic_file_too(tmp_path):
    p = write(tmp_path / "t.item", 'item_id:token\ttitle:token_seq\n0042\t"Quoted" title\n')
    assert read_items(p, Columns()).rows() == [("0042", '"Quoted" title', "")]


def test_csv_is_read_as_text(tmp_path):
    p = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n007,0042,10\n007,x,11\n")
    df = read_interactions(p, Columns())
    assert df["user"].to_list() == ["007", "007"] and df["item"].to_list() == ["0042", "x"]
    assert df["ts"].to_list() == [10.0, 11.0]


def test_a_late_non_integer_does_not_break_a_csv(tmp_path):
    """No type inference at all: a float or text id after many integer rows is read like the rest."""
    rows = "".join(f"u,{i},{i}\n" for i in range(200)) + "u,12.5,999\nu,abc,1000\n"
    df = read_interactions(write(tmp_path / "i.csv", "user_id,item_id,timestamp\n" + rows), Columns())
    assert df["item"].to_list()[-2:] == ["12.5", "abc"] and df.height == 202


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"nope\.csv: no such file"):
        read_interactions(tmp_path / "nope.csv", Columns())


# ---- interactions: columns, emptiness, nulls -----------------------------------------------------------------

def test_every_missing_column_is_named_with_its_role(tmp_path):
    p = write(tmp_path / "i.csv", "a,b\n1,2\n")
    with pytest.raises(UsageError, match=r"i\.csv: missing user column 'user_id', item column 'item_id', time column "
                                         r"'timestamp'; the file has columns \['a', 'b'\]\. Name the right ones"):
        read_interactions(p, Columns())
    with pytest.raises(UsageError, match=r"missing item column 'iid'; "):
        read_interactions(p, Columns(user="a", item="iid", time="b"))
    with pytest.raises(UsageError, match=r"missing time column 'when'; "):
        read_interactions(p, Columns(user="a", item="b", time="when"))


def test_a_file_without_rows_is_refused_and_one_row_is_enough(tmp_path):
    with pytest.raises(UsageError, match=r"i\.csv: no interactions"):
        read_interactions(write(tmp_path / "i.csv", "user_id,item_id,timestamp\n"), Columns())
    df = read_interactions(write(tmp_path / "j.csv", "user_id,item_id,timestamp\nu,1,5\n"), Columns())
    assert df.rows() == [(0, "u", "1", 5.0)]


def test_empty_ids_are_refused_per_role_and_column(tmp_path):
    cols = Columns(user="uid", item="iid", time="t")
    p = write(tmp_path / "i.csv", "uid,iid,t\n,1,5\n,2,6\nu,3,7\n")
    with pytest.raises(UsageError, match=r"i\.csv: 2 rows have an empty user id in column 'uid'; remove or fill them"):
        read_interactions(p, cols)
    p = write(tmp_path / "j.csv", "uid,iid,t\nu,,5\nu,2,6\n")
    with pytest.raises(UsageError, match=r"j\.csv: 1 rows have an empty item id in column 'iid'; remove or fill them"):
        read_interactions(p, cols)


# ---- item text -----------------------------------------------------------------------------------------------

def test_item_text_joins_the_extra_fields_and_fills_nulls(tmp_path):
    p = write(tmp_path / "items.csv", "iid,name,genre,year\n1,One,drama,1990\n2,,,1991\n3,Three,comedy,\n")
    cols = Columns(item_key="iid", title="name", text=("genre", "year"))
    df = read_items(p, cols)
    assert df.columns == ["item", "title", "text"]
    assert df.rows() == [("1", "One", "drama | 1990"), ("2", "", " | 1991"), ("3", "Three", "comedy | ")]
    plain = read_items(p, Columns(item_key="iid", title="name"))
    assert plain.rows() == [("1", "One", ""), ("2", "", ""), ("3", "Three", "")]


def test_item_columns_missing_are_named(tmp_path):
    p = write(tmp_path / "items.csv", "iid,name\n1,One\n")
    with pytest.raises(UsageError, match=r"items\.csv: missing item id column 'item_id', title column 'title'; "):
        read_items(p, Columns())
    with pytest.raises(UsageError, match=r"items\.csv: missing text column 'genre'; the file has columns"):
        read_items(p, Columns(item_key="iid", title="name", text=("genre",)))


def test_duplicate_item_names_the_first_duplicated_id_and_its_count(tmp_path):
    p = write(tmp_path / "items.csv", "item_id,title\n1,a\n2,b\n2,c\n1,d\n1,e\n")
    with pytest.raises(UsageError, match=r"items\.csv: item id '1' appears 3 times in column 'item_id'; keep one"):
        read_items(p, Columns())


# ---- the embedded data set -----------------------------------------------------------------------------------

def test_package_dir_finds_an_installed_package_without_importing_it():
    assert (package_dir("recbole") / "dataset_example" / "ml-100k").is_dir()


@pytest.mark.parametrize("name", ["no_such_package_gedistill", "math"])  # absent; a module, not a package
def test_package_dir_says_how_to_install(name):
    with pytest.raises(UsageError, match=rf"package '{name}' is not installed; run `make setup` \(it installs it "
                                         r"with `pip install --no-deps`\)"):
        package_dir(name)


def test_embedded_ml100k_is_read_in_place():
    inter, item = embedded_ml100k()
    assert inter == package_dir("recbole") / "dataset_example" / "ml-100k" / "ml-100k.inter"
    assert item == inter.with_name("ml-100k.item") and inter.is_file() and item.is_file()
    df = read_interactions(inter, Columns())
    assert df.height == 100_000 and df.row(0) == (0, "196", "242", 881250949.0)


@pytest.mark.parametrize("missing", ["ml-100k.inter", "ml-100k.item"])
def test_embedded_ml100k_missing_files_say_reinstall(tmp_path, monkeypatch, missing):
    folder = tmp_path / "dataset_example" / "ml-100k"
    folder.mkdir(parents=True)
    for f in ("ml-100k.inter", "ml-100k.item"):
        if f != missing:
            (folder / f).write_text("x\n")
    monkeypatch.setattr(sources, "package_dir", lambda name: tmp_path if name == "recbole" else None)
    with pytest.raises(UsageError, match=rf"{missing} is missing: reinstall with `pip install --no-deps recbole==1\.2\.1`"):
        embedded_ml100k()


def test_embedded_items_frame_on_the_real_file():
    df = embedded_items_frame(embedded_ml100k()[1])
    assert df.columns == ["item", "title", "text"] and df.height == 1682
    assert df.row(0) == ("1", "Toy Story (1995)", "genres: Animation Children's Comedy")


def test_embedded_items_frame_without_year_or_genres(tmp_path):
    p = write(tmp_path / "m.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                   "1\tA\t1990\tDrama War\n2\tB\t\tComedy\n3\t\t\t\n4\tD\t2001\t\n")
    assert embedded_items_frame(p).rows() == [
        ("1", "A (1990)", "genres: Drama War"), ("2", "B", "genres: Comedy"), ("3", "", "genres: "),
        ("4", "D (2001)", "genres: ")]
