"""Hand-made prepared data + candidates (written with the real writers, per CONTRACTS.md) and a fake teacher."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl

from pipeline.data.candidates import write_candidates
from pipeline.data.prepared import write_prepared

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
          "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)",
          "Seven (Se7en) (1995)", "Usual Suspects, The (1995)", "Mighty Aphrodite (1995)", "Postino, Il (1994)",
          "Mr. Holland's Opus (1995)", "From Dusk Till Dawn (1996)", "White Balloon, The (1995)",
          "Antonia's Line (1995)", "Angels and Insects (1995)", "Muppet Treasure Island (1996)", "Braveheart (1995)",
          "Taxi Driver (1976)", "Rumble in the Bronx (1995)", "Birdcage, The (1996)", "Bad Boys (1995)",
          "Apollo 13 (1995)", "Batman Forever (1995)", "Belle de jour (1967)", "Crimson Tide (1995)",
          "Desperado (1995)", "Doom Generation, The (1995)"]


def make_inputs(root: Path, n_users: int = 5, k: int = 8, per_user: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """prepared/ and candidates.parquet for `n_users` users, `per_user` samples each, K candidates."""
    rng = np.random.default_rng(seed)
    n_items = len(TITLES)
    seqs = []
    for u in range(n_users):
        items = rng.permutation(n_items)[: 8 + u] + 1
        seqs.append({"user_idx": u, "user_id": f"u{u}", "train": items[:-2].tolist(), "valid": int(items[-2]),
                     "test": int(items[-1])})
    seqs_df = pl.DataFrame(seqs)
    items_df = pl.DataFrame({"item_idx": np.arange(1, n_items + 1), "item_id": [f"i{i}" for i in range(1, n_items + 1)],
                             "title": TITLES, "text": [""] * n_items})
    summary = write_prepared(root / "prepared", seqs_df, items_df, {})
    users, positions, targets, cands = [], [], [], []
    for u, s in enumerate(seqs):
        train = s["train"]
        for p in range(len(train) - per_user, len(train)):
            unseen = [i for i in range(1, n_items + 1) if i not in train[:p]]
            pick = rng.permutation(unseen)[:k]
            users.append(u), positions.append(p), targets.append(train[p]), cands.append(pick)
    scores = -np.sort(rng.random((len(users), k)), axis=1)
    path = root / "candidates" / "candidates.parquet"
    write_candidates(path, np.array(users), np.array(positions), np.array(targets), np.array(cands), scores,
                     {"prepared_fingerprint": summary["fingerprint"], "selection": f"last {per_user} per user"})
    return root / "prepared", path


class CharTokenizer:
    """One token per character: '[', 'A', ']' are single tokens, like the real teacher's."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]

    def apply_chat_template(self, conversation: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        body = "".join(f"<{m['role']}>\n{m['content']}\n" for m in conversation)
        return body + ("<assistant>\n" if add_generation_prompt else "")


class FakeBackend:
    """Deterministic stand-in: h_dec hashed from the prompt, scores = h_dec @ a fixed head.

    Generate mode returns `generations` (cycled over the prompts), each row's first token as the
    tokenizer encodes it (EOS for an empty answer) and `hit_budget` (all False unless given).
    """

    hidden_size = 16
    context_length = 4096
    dtype_name = "float32"

    def __init__(self, generations: list[str] | None = None, hit_budget: list[bool] | None = None) -> None:
        self.tokenizer = CharTokenizer()
        self.calls = 0
        self.generations = generations or ["B] > [A] Toy Story > [B] > [Z]"]
        self.hit_budget = hit_budget
        self.max_new_tokens: list[int | None] = []

    def run(self, prompts, ident_ids, mode, progress=None, max_new_tokens=None):
        self.calls += 1
        self.max_new_tokens.append(max_new_tokens)
        h = np.stack([np.random.default_rng(int(hashlib.sha256(bytes(str(p), "utf8")).hexdigest()[:8], 16))
                      .standard_normal(self.hidden_size) for p in prompts]).astype(np.float32)
        head = np.random.default_rng(1).standard_normal((self.hidden_size, len(ident_ids))).astype(np.float32)
        out = SimpleNamespace(h_dec=h, scores=h @ head, generated=None)
        if mode == "generate":
            gen = [self.generations[i % len(self.generations)] for i in range(len(prompts))]
            out.generated = gen
            out.first_ids = np.array([self.tokenizer.encode(g)[0] if g else self.tokenizer.eos_token_id for g in gen])
            cut = self.hit_budget or [False]
            out.hit_budget = np.array([cut[i % len(cut)] for i in range(len(prompts))])
        if progress:
            progress(len(prompts))
        return out


FAKE_TEACHER = {"name": "fake", "revision": "test", "hidden_size": 16, "dtype": "float32"}
