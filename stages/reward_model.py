"""DVC stage: train `reward_models.<name>` (Bradley-Terry on feedback pairs, MLflow run) into models/<name>/,
metrics/ and plots/."""

import argparse
from pathlib import Path

from kd.distill.reward import train_reward_model
from kd.stage import run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="the reward model: a key of `reward_models` in params.yaml")
    args = parser.parse_args()
    return train_reward_model(args.name, Path("."))


if __name__ == "__main__":
    run(main)
