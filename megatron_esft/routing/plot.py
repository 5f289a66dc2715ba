"""Heatmap of expert scores (rows: MoE layers, columns: routed experts), with the selected experts outlined."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")  # headless: tools and training runs have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from megatron_esft.atomic import atomic_write_bytes  # noqa: E402
from megatron_esft.errors import UserError  # noqa: E402
from megatron_esft.routing.scores import ExpertScores  # noqa: E402


def heatmap_figure(
    scores: ExpertScores, method: str, selected: dict[str, list[int]] | None = None, title: str | None = None
) -> Figure:
    table = scores.method_scores(method)
    n_layers, n_experts = table.shape
    fig = Figure(figsize=(max(6.0, 0.16 * n_experts + 2.0), max(3.0, 0.28 * n_layers + 1.5)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"{method} score")
    if selected:
        for li, key in enumerate(scores.layers):
            for expert in selected.get(key, []):
                ax.add_patch(Rectangle((expert - 0.5, li - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlabel("routed expert (global id)")
    ax.set_ylabel("decoder layer (HF index)")
    step = max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_yticklabels(scores.layers[::step])
    xstep = max(1, n_experts // 16)
    ax.set_xticks(range(0, n_experts, xstep))
    if title is None:
        n_sel = sum(len(v) for v in (selected or {}).values())
        title = f"ESFT-{method.capitalize()} scores" + (f" ({n_sel} experts selected, red)" if selected else "")
    ax.set_title(title)
    fig.tight_layout()
    return fig


IMAGE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def image_format(path: str | os.PathLike) -> str:
    """The image format a file name asks for (its suffix, as matplotlib would read it); a UserError for any other
    suffix, so that `x.txt` is not silently written as a PNG."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in IMAGE_FORMATS:
        raise UserError(f"--out {os.fspath(path)}: unsupported image file suffix {suffix or '(none)'!r} "
                        f"(use {', '.join(IMAGE_FORMATS)})")
    return IMAGE_FORMATS[suffix]


def save_heatmap(path: str | os.PathLike, scores: ExpertScores, method: str, selected=None, title=None) -> None:
    """Write the heatmap atomically as PNG, PDF or SVG, by the file's suffix."""
    image = image_format(path)
    fig = heatmap_figure(scores, method, selected, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def log_heatmap(writer, tag: str, scores: ExpertScores, method: str, selected=None, step: int = 0) -> None:
    """Log the heatmap to a TensorBoard `SummaryWriter`."""
    writer.add_figure(tag, heatmap_figure(scores, method, selected), global_step=step)
