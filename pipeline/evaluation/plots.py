"""PNG plots for evaluate: training curves, the metric comparison with intervals, teacher position bias."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.evaluation.stats import PairedDiff  # noqa: E402

COLORS = {"baseline": "#4c72b0", "distilled": "#dd8452"}


def _save(fig, path: Path) -> Path:
    """Write the figure as PNG (folder created) and free it. No metadata: matplotlib writes its version
    into a PNG text chunk (and dates into other formats); plots are a DVC output, and an output must hash
    the same wherever the same data is plotted."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i + 2}")


def plot_training(histories: dict[str, list[dict]], path: Path, notes: dict[str, str] | None = None) -> Path:
    """Per-epoch curves of each run: training losses, validation NDCG@10, and the collapse check
    (mean ||u_sas||, mean ||W_p(h_dec)|| and the embedding loss) where a run has them."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_valid), (ax_norm, ax_emb) = axes
    ax_spread = None  # a right-hand axis for the spreads, which are far smaller than the norms
    for i, (name, rows) in enumerate(histories.items()):
        if not rows:
            continue
        label = f"{name} ({notes[name]})" if notes and notes.get(name) else name
        ep = [r["epoch"] for r in rows]
        c = _color(name, i)
        for key, style in (("loss", "-"), ("loss_rec", "--"), ("l_rank", ":")):
            if key in rows[0]:
                ax_loss.plot(ep, [r.get(key, np.nan) for r in rows], style, color=c, label=f"{name} {key}")
        if "valid_ndcg@10" in rows[0]:
            ax_valid.plot(ep, [r["valid_ndcg@10"] for r in rows], "-o", ms=2, color=c, label=label)
        if "u_norm" in rows[0]:
            ax_norm.plot(ep, [r["u_norm"] for r in rows], "-", color=c, label=f"{name} ||u_sas||")
            ax_norm.plot(ep, [r["proj_norm"] for r in rows], "--", color=c, label=f"{name} ||W_p(h_dec)||")
            if "u_spread" in rows[0]:  # per-feature std across users: 0 = every user gets one vector
                ax_spread = ax_spread or ax_norm.twinx()
                ax_spread.plot(ep, [r["u_spread"] for r in rows], ":", color=c, label=f"{name} spread of u_sas (right)")
                ax_spread.plot(ep, [r["proj_spread"] for r in rows], "-.", color=c, label=f"{name} spread of W_p(h_dec) (right)")
            ax_emb.plot(ep, [r["l_emb"] for r in rows], "-", color=c, label=f"{label} L_emb")
    ax_loss.set(title="training losses (per-step mean)", xlabel="epoch")
    ax_valid.set(title="validation NDCG@10", xlabel="epoch")
    ax_norm.set(title="collapse check: mean norms (left), spread across users (right)", xlabel="epoch", ylim=(0, None))
    if ax_spread is not None:
        ax_spread.set(ylim=(0, None), ylabel="mean per-feature std")
        handles = [h for ax in (ax_norm, ax_spread) for h in ax.get_legend_handles_labels()[0]]
        ax_norm.legend(handles, [h.get_label() for h in handles], fontsize=7)
    ax_emb.set(title="embedding loss", xlabel="epoch", ylim=(0, None))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax is ax_norm and ax_spread is not None:
            continue  # its legend already holds both axes' lines
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data for this panel", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(fig, path)


def plot_comparison(diffs: dict[str, PairedDiff], path: Path, name_a: str = "baseline", name_b: str = "distilled") -> Path:
    """Left: each model's test metrics. Right: the paired difference (b - a) with its 95% bootstrap CI."""
    names = list(diffs)
    x = np.arange(len(names))
    fig, (ax_m, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    w = 0.38
    ax_m.bar(x - w / 2, [diffs[n].mean_a for n in names], w, color=_color(name_a, 0), label=name_a)
    ax_m.bar(x + w / 2, [diffs[n].mean_b for n in names], w, color=_color(name_b, 1), label=name_b)
    ax_m.set_xticks(x, names)
    n_users = next(iter(diffs.values())).n_users
    ax_m.set(title=f"test metrics ({n_users:,} users, full ranking)")
    ax_m.legend()
    d = np.array([diffs[n].diff for n in names])
    lo = d - np.array([diffs[n].ci_low for n in names])
    hi = np.array([diffs[n].ci_high for n in names]) - d
    colors = ["#2a9d8f" if diffs[n].significant and diffs[n].diff > 0 else
              "#e76f51" if diffs[n].significant else "#8d99ae" for n in names]
    ax_d.bar(x, d, 0.55, color=colors, yerr=np.vstack([lo, hi]), capsize=5)
    ax_d.axhline(0, color="black", lw=0.8)
    ax_d.set_xticks(x, names)
    ax_d.set(title=f"{name_b} - {name_a}, paired bootstrap 95% CI\n(green/red: significant, grey: not)")
    for ax in (ax_m, ax_d):
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_teacher(top1_counts: np.ndarray, target_rank_counts: dict[str, np.ndarray], path: Path) -> Path:
    """Left: where the teacher's top-1 identifier sits in the list shown to it (position bias).
    Right: rank of the target among the K candidates, teacher vs students (samples holding it)."""
    k = len(top1_counts)
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    total = max(1, int(top1_counts.sum()))
    ax_p.bar(np.arange(k), top1_counts / total, color="#6d597a")
    ax_p.axhline(1 / k, color="black", ls="--", lw=0.8, label="uniform")
    labels = [chr(ord("A") + i) if k <= 26 else str(i + 1) for i in range(k)]
    ax_p.set_xticks(np.arange(k), labels, fontsize=7)
    ax_p.set(title=f"teacher's top-1 identifier position ({total:,} samples)", ylabel="share")
    ax_p.legend()
    w = 0.8 / max(1, len(target_rank_counts))
    for i, (name, counts) in enumerate(target_rank_counts.items()):
        share = counts / max(1, counts.sum())
        ax_r.bar(np.arange(k) + (i - (len(target_rank_counts) - 1) / 2) * w, share, w, label=name,
                 color=_color(name, i) if name in COLORS else "#6d597a" if name == "teacher" else f"C{i + 2}")
    ax_r.axhline(1 / k, color="black", ls="--", lw=0.8, label="uniform")
    ax_r.set_xticks(np.arange(0, k, max(1, k // 10)))
    ax_r.set(title="rank of the target among the same candidates\n(samples holding it; training prefixes)",
             xlabel="rank (0 = first)", ylabel="share")
    ax_r.legend(fontsize=8)
    for ax in (ax_p, ax_r):
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
