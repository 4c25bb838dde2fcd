"""Drawing search results: thumbnails with the matched region of each sub-query."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from himir_rag.images import load_image
from himir_rag.index import SearchResult

__all__ = ["plot_results", "SUBQUERY_COLORS"]

SUBQUERY_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def plot_results(results: Sequence[SearchResult], *, top: int = 3, path: str | Path | None = None,
                 thumb_inches: float = 3.0, subqueries: Sequence[str] | None = None) -> Any:
    """Grid of the ``top`` hits of each result (one row per query), matched regions drawn.

    Each sub-query gets one colour (legend per row); the box is the region that matched
    it best, labelled with its level and similarity.

    Parameters
    ----------
    results : sequence of SearchResult
    top : int
        Hits per row.
    path : path, optional
        Where to save the figure as PNG.
    subqueries : sequence of str, optional
        Draw only the matches of these sub-queries (e.g. a few of a query photo's
        ``"photo region [...]"`` labels, which are 1+M+N); default: all.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rows = max(1, len(results))
    fig, axes = plt.subplots(rows, top, figsize=(thumb_inches * top, thumb_inches * 0.9 * rows), squeeze=False)
    for row, result in enumerate(results):
        for col in range(top):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(result.hits):
                continue
            hit = result.hits[col]
            ax.imshow(load_image(hit.path))
            for sub_idx, match in enumerate(_shown(hit.regions, subqueries)):
                x0, y0, x1, y1 = match.bbox
                color = SUBQUERY_COLORS[sub_idx % len(SUBQUERY_COLORS)]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, ec=color))
                ax.text(x0 + 3, y0 + 3, f"{match.level} {match.score:.2f}", color="white", fontsize=7, va="top",
                        bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "lw": 0})
            ax.set_title(f"#{col + 1} {Path(hit.path).name}  score {hit.score:.3f}", fontsize=8)
        labels = [m.subquery for m in _shown(result.hits[0].regions, subqueries)] if result.hits else list(result.subqueries)
        handles = [Patch(color=SUBQUERY_COLORS[i % len(SUBQUERY_COLORS)], label=label)
                   for i, label in enumerate(labels)]
        axes[row][0].legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.02), fontsize=7, frameon=False,
                            title=_title(result), title_fontsize=8, ncol=_legend_columns(labels))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


def _shown(regions: Sequence[Any], subqueries: Sequence[str] | None) -> list[Any]:
    """The matches to draw: all, or those of the chosen sub-queries."""
    return list(regions) if subqueries is None else [m for m in regions if m.subquery in set(subqueries)]


def _title(result: SearchResult) -> str:
    """The query as a legend title: the text, the query photo's name, or both."""
    parts = [f"\u201c{result.query}\u201d"] if result.query else []
    if result.image is not None:
        parts.append(f"photo {Path(result.image).name}")
    return " + ".join(parts)


def _legend_columns(labels: Sequence[str]) -> int:
    """Up to 3 columns of short labels; long ones (a query photo's region labels) one per line,
    so the legend stays as wide as the first photo and does not shrink the row."""
    return 1 if any(len(label) > 18 for label in labels) else min(3, max(1, len(labels)))
