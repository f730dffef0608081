"""DVC stage: build `datasets.<name>` with the feedback method. Feedback: a generator samples candidates, a judge ranks them into preference pairs (TRL DPO format)."""

from pathlib import Path

from kd.elicit.build import build_dataset
from kd.elicit.feedback import feedback
from kd.stage import dataset_argv, run


def main() -> str:
    args = dataset_argv(__doc__)
    return build_dataset(args.name, "feedback", feedback, Path("."))


if __name__ == "__main__":
    run(main)
