"""DVC stage: build `datasets.<name>` with the expansion method. Expansion: Self-Instruct rounds and Evol-Instruct operators."""

from pathlib import Path

from kd.elicit.build import build_dataset
from kd.elicit.expansion import expand
from kd.stage import dataset_argv, run


def main() -> str:
    args = dataset_argv(__doc__)
    return build_dataset(args.name, "expansion", expand, Path("."))


if __name__ == "__main__":
    run(main)
