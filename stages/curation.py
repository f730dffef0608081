"""DVC stage: build `datasets.<name>` with the curation method. Curation: topic x attribute -> teacher-written questions -> teacher answers."""

from pathlib import Path

from kd.elicit.build import build_dataset
from kd.elicit.curation import curate
from kd.stage import dataset_argv, run


def main() -> str:
    args = dataset_argv(__doc__)
    return build_dataset(args.name, "curation", curate, Path("."))


if __name__ == "__main__":
    run(main)
