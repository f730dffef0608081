"""DVC stage: evaluate the teacher, the untrained baseline and every student on the held-out prompts.

Writes reports/metrics.json (DVC metrics), reports/plots/ (DVC plots), reports/generations.jsonl and
reports/report.md; wall times go to stdout and MLflow only, so the reports are byte-stable. With
`evaluation.reward_model` / `evaluation.judge` the reports also carry every model's mean reward and each
student's win rate; those requests go through the request cache (.kd/cache), so a rerun asks nothing new.
"""

import argparse
from pathlib import Path

from kd.config import load_params
from kd.evaluation.evaluate import evaluate, summary
from kd.evaluation.outputs import log_mlflow, write_reports
from kd.stage import run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", default="reports", help="output directory (default: reports)")
    args = parser.parse_args()
    root = Path(".")
    params = load_params(root, args.params)
    result = evaluate(params, root)
    write_reports(result, root / args.out, root)
    run_id = log_mlflow(result, root, params.project, params.evaluation.model_dump(mode="json"))
    print(f"evaluate: MLflow run {run_id}")
    return summary(result)


if __name__ == "__main__":
    run(main)
