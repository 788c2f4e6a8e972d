"""One row of line panels, one line per run, shared by the issue-18 experiment scripts."""

from __future__ import annotations


def plot_panels(path: str, runs: list[tuple[str, list, list[list[float]]]], titles: list[str],
                *, marker: str | None = None, hline: float | None = None,
                width: float = 4.5) -> str:
    """``runs``: (label, xs, [ys for each panel]); panel k plots every run's ys[k] against xs
    in the run's own colour (``tab20``), titled ``titles[k]``; ``hline``: a dotted line in the
    first panel. Writes the PNG ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(titles), figsize=(width * len(titles), 4.0), squeeze=False)
    axes = axes[0]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    if hline is not None:
        axes[0].axhline(hline, color="gray", ls=":", lw=0.8)
    colors = plt.cm.tab20.colors
    for i, (label, xs, ys) in enumerate(runs):
        color = colors[(2 * i) % 20 + (2 * i) // 20]
        for k, ax in enumerate(axes):
            ax.plot(xs, ys[k], marker=marker, lw=1, color=color, label=label if k == 0 else None)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
