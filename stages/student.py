"""DVC stage: train `students.<name>` (init, objective, MLflow run) into models/<name>/, metrics/ and plots/."""

import argparse
from pathlib import Path

from kd.distill.students import train_student
from kd.stage import run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="the student: a key of `students` in params.yaml")
    args = parser.parse_args()
    return train_student(args.name, Path("."))


if __name__ == "__main__":
    run(main)
