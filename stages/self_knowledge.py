"""DVC stage: build `datasets.<name>` with the self_knowledge method. Self-knowledge: the student samples K answers per prompt and keeps those its filter trusts (one round per dataset)."""

from pathlib import Path

from kd.elicit.build import build_dataset
from kd.elicit.self_knowledge import self_knowledge
from kd.stage import dataset_argv, run


def main() -> str:
    args = dataset_argv(__doc__)
    return build_dataset(args.name, "self_knowledge", self_knowledge, Path("."))


if __name__ == "__main__":
    run(main)
