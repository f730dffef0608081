"""What every stage entry point shares: argv, one-line errors, exit codes, and SIGTERM handled like Ctrl-C.

Exit codes: 0 done; 2 a user mistake (one line naming its culprit); 130 interrupted (Ctrl-C); 143 terminated
(SIGTERM, what `timeout`, schedulers and `docker stop` send). An interrupted or terminated stage ends its MLflow
run KILLED and keeps the answers received so far in the request cache, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from kd.config import PARAMS_STAGE
from kd.errors import KdError, printable
from kd.secrets import redact

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so every path that cleans up after Ctrl-C (MLflow runs end KILLED,
    checkpoints and cached answers kept, temporary outputs never renamed into place) cleans up after it too."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def dataset_argv(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("name", help="the dataset: a key of `datasets` in params.yaml")
    return parser.parse_args()


def run(main: Callable[[], str | None]) -> None:
    """Run a stage; a user mistake prints one line naming its culprit and exits 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        line = main()
    except KdError as e:
        stage = os.environ.get("DVC_STAGE", "")  # set by `dvc repro`, which removed this stage's outputs first
        hint = "" if stage in ("", PARAMS_STAGE) else \
            f"; `dvc checkout {stage}` brings back the outputs dvc repro removed before running the stage"
        # no message may carry a key (kd.secrets) or send a control character that a seed row or an answer held
        print(f"kd: error: {printable(redact(str(e)))}{hint}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Terminated:
        print("kd: terminated (SIGTERM); answers received so far are cached", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        print("kd: interrupted; answers received so far are cached", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if line:
        print(line)
