"""Heatmap: one outlined cell per selected expert; the same figure reaches TensorBoard."""

import numpy as np
import pytest

from megatron_esft.errors import UserError
from megatron_esft.routing.plot import heatmap_figure, log_heatmap, save_heatmap
from megatron_esft.routing.scores import ExpertScores
from megatron_esft.routing.selection import select_top_p


def _scores():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 8))
    return ExpertScores.from_counts(["1", "2", "3"], counts, counts * 0.1, counts.sum(1) // 2, topk=2)


def test_heatmap_marks_selected_experts(tmp_path):
    from matplotlib.patches import Rectangle

    scores = _scores()
    selected = select_top_p(scores, "token", 0.3)
    fig = heatmap_figure(scores, "token", selected)
    ax = fig.axes[0]
    boxes = {(int(p.get_x() + 0.5), int(p.get_y() + 0.5)) for p in ax.patches if isinstance(p, Rectangle)}
    assert boxes == {(e, li) for li, key in enumerate(scores.layers) for e in selected[key]}
    np.testing.assert_array_equal(ax.images[0].get_array(), scores.token_scores)
    save_heatmap(tmp_path / "h.png", scores, "gate", selected)
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the format follows the suffix; another suffix is a one-line error and writes nothing
    save_heatmap(tmp_path / "h.PDF", scores, "gate", selected)
    assert (tmp_path / "h.PDF").read_bytes()[:5] == b"%PDF-"
    save_heatmap(tmp_path / "h.svg", scores, "gate", selected)
    assert b"<svg" in (tmp_path / "h.svg").read_bytes()[:2000]
    for name in ("h.txt", "h"):
        with pytest.raises(UserError, match=rf"--out .*{name}: unsupported image file suffix"):
            save_heatmap(tmp_path / name, scores, "gate", selected)
        assert not (tmp_path / name).exists()


def test_heatmap_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    scores = _scores()
    log_heatmap(writer, "expert_scores/token", scores, "token", select_top_p(scores, "token", 0.2), step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path)).Reload()
    assert events.Tags()["images"] == ["expert_scores/token"]
    image = events.Images("expert_scores/token")[0]
    assert image.step == 3 and image.encoded_image_string[:4] == b"\x89PNG" and image.width > 100
