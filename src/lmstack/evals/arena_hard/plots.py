"""PNG plots (matplotlib, Agg backend): leaderboard CIs, meta-eval metrics, quality score by cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_leaderboard(rows: list[dict[str, Any]], title: str, path: str | Path) -> None:
    """Win rate vs the baseline with its bootstrap CI, one row per model, best on top."""
    rows = sorted(rows, key=lambda r: r["score"])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rows)))
    y = range(len(rows))
    scores = [r["score"] for r in rows]
    err = [[r["score"] - r["lower"] for r in rows], [r["upper"] - r["score"] for r in rows]]
    ax.errorbar(scores, y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(list(y), [r["model"] for r in rows])
    ax.axvline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate vs baseline (%), 95% bootstrap CI")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_meta_eval(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Grouped bars: the four benchmark-quality metrics per benchmark (Brier: lower is better)."""
    metrics = ["separability", "agreement", "spearman", "brier"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [results[name][m] for m in metrics], width, label=results[name]["label"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("benchmark quality vs Chatbot Arena (Brier: lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_clusters(clusters: list[dict[str, Any]], path: str | Path) -> None:
    """Mean quality score (0-7) per topic cluster with its standard error; selected clusters highlighted."""
    clusters = sorted(clusters, key=lambda c: c["mean_score"])
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.22 * len(clusters)))
    y = range(len(clusters))
    colors = ["tab:orange" if c.get("selected") else "tab:blue" for c in clusters]
    ax.barh(list(y), [c["mean_score"] for c in clusters], xerr=[c["sem"] for c in clusters], color=colors)
    ax.set_yticks(list(y), [f"{c['name'][:40]} (n={c['size']})" for c in clusters], fontsize=6)
    ax.set_xlabel("mean quality score (criteria met, 0-7); orange: selected")
    ax.set_xlim(0, 7)
    _save(fig, path)
