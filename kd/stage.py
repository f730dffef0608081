"""What every stage entry point shares: argv, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from kd.config import PARAMS_STAGE
from kd.errors import KdError
from kd.secrets import redact


def dataset_argv(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("name", help="the dataset: a key of `datasets` in params.yaml")
    return parser.parse_args()


def run(main: Callable[[], str | None]) -> None:
    """Run a stage; a user mistake prints one line naming its culprit and exits 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        line = main()
    except KdError as e:
        stage = os.environ.get("DVC_STAGE", "")  # set by `dvc repro`, which removed this stage's outputs first
        hint = "" if stage in ("", PARAMS_STAGE) else \
            f"; `dvc checkout {stage}` brings back the outputs dvc repro removed before running the stage"
        print(f"kd: error: {redact(str(e))}{hint}", file=sys.stderr)  # no message may carry a key (kd.secrets)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kd: interrupted; answers received so far are cached", file=sys.stderr)
        sys.exit(130)
    if line:
        print(line)
