"""DVC stage `params`: validate params.yaml, its templates and seeds before any other stage runs.

DVC removes a stage's outputs before running its command, so a mistake found by the stage itself would cost the
dataset it was rebuilding. Every stage depends on this one's out, so `dvc repro` stops here, with nothing removed.
"""

from pathlib import Path

from kd.paths import PARAMS_CHECKED
from kd.pipeline.check import validate
from kd.records import atomic_write_text
from kd.stage import run

# The same bytes whatever params.yaml says: downstream stages are not made stale by this stage rerunning.
CONTENT = "params.yaml, its templates and its seeds validated by stages/params.py before the other stages ran\n"


def main() -> str:
    params, templates = validate(Path("."))
    atomic_write_text(PARAMS_CHECKED, CONTENT)
    return (f"params: OK ({len(params.datasets)} datasets, {len(params.students)} students, "
            f"{len(templates)} templates)")


if __name__ == "__main__":
    run(main)
