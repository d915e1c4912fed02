"""Shared fixtures: small hand-made datasets written as the user would give them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("GEDISTILL_NO_PROGRESS", "1")


def synthetic_interactions(n_users: int = 60, n_items: int = 40, length: int = 12, seed: int = 0) -> pl.DataFrame:
    """Users walk item ids upward with step 1 or 2 (mod n_items): a learnable sequential signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        item = int(rng.integers(n_items))
        for t in range(length):
            rows.append((f"u{u}", f"i{item}", 1_000_000 + 100 * t))
            item = (item + int(rng.integers(1, 3))) % n_items
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


@pytest.fixture
def tiny_csv(tmp_path: Path) -> tuple[Path, Path]:
    inter = tmp_path / "inter.csv"
    synthetic_interactions().write_csv(inter)
    items = tmp_path / "items.csv"
    pl.DataFrame({"item_id": [f"i{i}" for i in range(40)], "title": [f"Movie {i}" for i in range(40)],
                  "genre": ["Drama" if i % 2 else "Comedy" for i in range(40)]}).write_csv(items)
    return inter, items
