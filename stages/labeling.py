"""DVC stage: build `datasets.<name>` with the labeling method. Labeling: the teacher answers inputs from seeds or datasets."""

from pathlib import Path

from kd.elicit.build import build_dataset
from kd.elicit.labeling import label
from kd.stage import dataset_argv, run


def main() -> str:
    args = dataset_argv(__doc__)
    return build_dataset(args.name, "labeling", label, Path("."))


if __name__ == "__main__":
    run(main)
