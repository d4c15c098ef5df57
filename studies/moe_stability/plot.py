"""Draw the study's figures from its ``metrics.csv`` (no re-run needed): ``python plot.py <results folder>``.

- ``accuracy.png``: greedy and sampled held-out accuracy against rollout batches, greedy against training wall
  time; a line per arm (mean over seeds) with a band from the lowest to the highest seed.
- ``clipping.png``: token and sequence clip fractions per rollout batch.
- ``routing.png``: ``moe/routing_change_frac`` (pi_old vs pi_theta, across mini-batches),
  ``moe/rollout_routing_mismatch_frac`` (engine vs trainer) and the engine/trainer log-prob gap.

Per-batch curves are smoothed with a moving mean of ``SMOOTH`` rollout batches. Needs matplotlib
(``pip install -e ".[study]"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

SMOOTH = 10


def _band(ax, x: np.ndarray, curves: np.ndarray, label: str, color) -> None:
    """Mean over seeds (rows of ``curves``) with a min-max band."""
    ax.plot(x, np.nanmean(curves, axis=0), label=label, color=color)
    if len(curves) > 1:
        ax.fill_between(x, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), color=color, alpha=0.2)


def _per_seed(frame: pd.DataFrame, column: str, smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``column`` against rollout batch, one row per seed (aligned on the batches every seed has)."""
    table = frame.pivot_table(index="rollout_batch", columns="seed", values=column).dropna()
    if smooth > 1:
        table = table.rolling(smooth, min_periods=1).mean()
    return table.index.to_numpy(), table.to_numpy().T


def _against_time(frame: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
    """Greedy accuracy of each seed against cumulative training seconds, held between evaluations."""
    curves = []
    for _, run in frame.groupby("seed"):
        evals = run.dropna(subset=["val_accuracy"]).sort_values("train_s")
        index = np.searchsorted(evals["train_s"].to_numpy(), grid, side="right") - 1
        values = evals["val_accuracy"].to_numpy()[np.clip(index, 0, None)]
        curves.append(np.where(grid <= evals["train_s"].max(), values, np.nan))
    return np.array(curves)


def draw(out: Path) -> list[Path]:
    """Write the three figures into ``out``; returns their paths."""
    metrics = pd.read_csv(out / "metrics.csv")
    arms = list(dict.fromkeys(metrics["arm"]))
    colors = dict(zip(arms, plt.get_cmap("tab10").colors))
    evals, steps = metrics[metrics["val_accuracy"].notna()], metrics[metrics["reward"].notna()]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    # up to the time every run reached: a mean over fewer seeds after some runs ended would jump
    grid = np.linspace(0, steps.groupby(["arm", "seed"])["train_s"].max().min(), 200)
    for arm in arms:
        _band(axes[0], *_per_seed(evals[evals["arm"] == arm], "val_accuracy"), arm, colors[arm])
        _band(axes[1], *_per_seed(evals[evals["arm"] == arm], "val_accuracy_sampled"), arm, colors[arm])
        _band(axes[2], grid, _against_time(evals[evals["arm"] == arm], grid), arm, colors[arm])
    for ax, title, xlabel in zip(
        axes,
        ("held-out accuracy, greedy", "held-out accuracy, sampled (T=1)", "greedy accuracy vs training time"),
        ("rollout batch", "rollout batch", "training wall time (s): generation + scoring + updates"),
    ):
        ax.set(title=title, xlabel=xlabel, ylabel="accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend()
    written.append(_save(fig, out / "accuracy.png"))

    panels = {
        "clipping.png": [
            ("clip_frac_token", "token clip fraction", "log"),
            ("clip_frac_seq", "sequence clip fraction", "log"),
        ],
        "routing.png": [
            ("routing_change_frac", "routing change pi_old -> pi_theta (moe/routing_change_frac)", "log"),
            ("rollout_mismatch_frac", "engine vs trainer routing (moe/rollout_routing_mismatch_frac)", "linear"),
            ("logprob_gap_mean", "engine vs trainer log-prob gap, mean |diff|", "linear"),
        ],
    }
    for name, columns in panels.items():
        fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.5))
        for ax, (column, title, scale) in zip(axes, columns):
            for arm in arms:
                frame = steps[steps["arm"] == arm]
                if frame[column].notna().any():
                    _band(ax, *_per_seed(frame, column, SMOOTH), arm, colors[arm])
            ax.set(title=title, xlabel="rollout batch")
            if scale == "log":
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        written.append(_save(fig, out / name))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    draw(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results"))
