"""`make demo` end to end with a handful of iterations: every pipeline step runs and the report is written."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "tiny" / "run_demo.py"), "--out", str(out),
                           "--pretrain-iters", "4", "--finetune-iters", "4", "--eval-samples", "3"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("report.md", "expert_config.json", "heatmap_intent.png", "adapter/expert_cfg.json",
                 "merged_hf/config.json", "base/latest_checkpointed_iteration.txt"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard" / "esft").rglob("events.out.tfevents.*"))
    report = (out / "report.md").read_text()
    assert "| esft |" in report and "| fft |" in report
