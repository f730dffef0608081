"""DVC stage: build `datasets.<name>` with the feature method. Feature: the local teacher's top-k log-probabilities at every completion token of a dataset."""

from pathlib import Path

from kd.elicit.feature import build_features
from kd.stage import dataset_argv, run


def main() -> str:
    args = dataset_argv(__doc__)
    return build_features(args.name, Path("."))


if __name__ == "__main__":
    run(main)
