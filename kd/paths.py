"""Where a kd project keeps things, relative to its root: one home for every default path."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path("data")  # data/<dataset>/: records, manifest, rejections (DVC outs)
MODELS_DIR = Path("models")  # models/<student or reward model>/ (DVC outs)
METRICS_DIR = Path("metrics")  # metrics/<stage>.json (DVC metrics)
PLOTS_DIR = Path("plots")  # plots/<model>.csv: training curves (DVC plots)
REPORTS_DIR = Path("reports")  # the evaluation's report, metrics, plots and generations
FIGURES_DIR = "figures"  # reports/figures/: the SVG charts report.md embeds (relative links), beside it
KD_DIR = Path(".kd")  # kd's own state, git-ignored: never a DVC out
CACHE_DIR = KD_DIR / "cache"  # the request cache
BATCHES_DIR = KD_DIR / "batches"  # Batch API jobs submitted and not yet collected, one JSON file per batch id
CHECKPOINTS_DIR = KD_DIR / "checkpoints"  # resumable training state, outside the outs DVC deletes
DIGEST_MEMO = KD_DIR / "digests.json"  # model directory digests by (path, size, mtime)
PARAMS_FILE = "params.yaml"
# the `params` stage's out, which every other stage depends on: written only when params.yaml validates, and always
# with the same bytes, so it orders the graph (validation before any stage's outs are removed) without making
# anything stale
PARAMS_CHECKED = DATA_DIR / "params.checked"
DVC_FILE = "dvc.yaml"


def under(root: Path | str, path: Path | str) -> Path:
    """`path` relative to the project `root` (an absolute path stays as it is)."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path
