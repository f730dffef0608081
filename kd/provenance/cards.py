"""Dataset cards: the README.md the Hugging Face hub shows for data/<name>/, summarising provenance.

Written from the manifest and build totals only, with no timestamps or paths of the machine, so a rebuild
with the same records writes the same bytes (DVC's early cutoff depends on it). The YAML front matter's
`configs` points `datasets.load_dataset("data/<name>")` at records.jsonl, not at rejected.jsonl, which is a
config of its own.
"""

from __future__ import annotations

import json
from typing import Any

from kd.runtime.environment import environment_lines

METHODS = {
    "labeling": "the teacher answered inputs from seeds or upstream datasets (survey §3.1.1)",
    "expansion": "Self-Instruct rounds and Evol-Instruct operators wrote new instructions (survey §3.1.2)",
    "curation": "topic x attribute seeds -> teacher-written questions -> teacher answers (survey §3.1.3)",
    "feature": "the teacher's top-k log-probabilities on every completion token (survey §3.1.4)",
    "feedback": "a generator sampled candidates and a judge ranked them into preference pairs (survey §3.1.5)",
    "self_knowledge": "the student's own samples, kept by a self-consistency, reward or self-judge filter "
                      "(survey §3.1.6)",
}
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"))


REJECTED_CONFIG = "rejected"
# What each method's records hold for a trainer (DESIGN.md §3): TRL's prompt-completion, preference or logits shapes.
COLUMNS = {
    "labeling": "`prompt` + `completion`, conversational: SFTTrainer",
    "expansion": "`prompt` alone, conversational (instructions without answers): GRPOTrainer, RLOOTrainer",
    "curation": "`prompt` + `completion`, conversational: SFTTrainer",
    "self_knowledge": "`prompt` + `completion`, conversational: SFTTrainer",
    "feedback": "`prompt` + `chosen` + `rejected`, conversational: DPOTrainer, RewardTrainer",
    "feature": "the parent's records with the teacher's top-k log-probabilities: kd's KD objectives",
}


def size_category(n: int) -> str:
    return next((label for limit, label in _SIZES if n < limit), "10M<n<100M")


def configs(manifest: dict[str, Any]) -> list[str]:
    """The card's `configs:` (YAML lines): `default`, the records file, which `load_dataset("data/<name>")` loads;
    `rejected`, the rejections with their reasons, when there are any (an empty file would not load)."""
    files = manifest["files"]
    out = ["configs:", "- config_name: default", "  default: true", "  data_files:", "  - split: train",
           f"    path: {files['records']}"]
    if manifest.get("rejected") and files.get("rejected"):
        out += [f"- config_name: {REJECTED_CONFIG}", "  data_files:", "  - split: train", f"    path: {files['rejected']}"]
    return out


def render_card(manifest: dict[str, Any], parents: list[dict[str, Any]], usage: dict[str, int], cost: str,
                seeds: dict[str, int] | None = None) -> str:
    """The card text.

    Args:
        manifest: what `kd.records.write_dataset` wrote to manifest.json.
        parents: upstream datasets, each `{"name", "fingerprint", "records"}` (fingerprint None if unbuilt).
        usage: prompt/completion tokens of every request that built the dataset, cached or not.
        cost: that usage priced from params (e.g. "free", "$0.0123"); deterministic like the usage.
        seeds: seed file -> how many of its rows the records descend from directly.
    """
    name, method = manifest["name"], manifest["method"]
    rejected = manifest.get("rejected") or {}
    front = ["---", "license: unknown  # the teacher's license and terms govern its outputs",
             "task_categories:", "- text-generation", "tags:", "- kd", "- synthetic", "- distillation",
             f"- {method}", "size_categories:", f"- {size_category(manifest['records'])}", *configs(manifest),
             "---", ""]
    body = [f"# {name}", "",
            f"Built by kd {manifest.get('kd_version', '?')} with the **{method}** method: {METHODS.get(method, method)}.",
            "Every record carries its provenance (template hashes, request keys, teacher, sampling, parents, "
            "seeds, token usage); `kd audit <record id>` walks it back to the seeds.", "",
            "| | |", "|---|---|",
            f"| records | {manifest['records']} |",
            f"| rejected | {sum(rejected.values())} |",
            f"| fingerprint | `{manifest['fingerprint']}` |",
            f"| tokens (all requests) | {usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion |",
            f"| cost (all requests) | {cost} |", ""]
    teacher = manifest.get("teacher") or {}
    body += ["## Teacher", ""] + [f"- {k}: `{json.dumps(v)}`" for k, v in sorted(teacher.items())] + [""]
    if manifest.get("environment"):  # where fresh answers were computed; a cached answer may be older
        body += ["## Environment", "", *environment_lines(manifest["environment"]), ""]
    if manifest.get("templates"):
        body += ["## Templates", "", "| path | sha256 |", "|---|---|"]
        body += [f"| {t['path']} | `{t['sha256']}` |" for t in manifest["templates"]] + [""]
    if rejected:
        body += ["## Rejections", "", "Every dropped answer is in `rejected.jsonl` with its reason.", "",
                 "| reason | count |", "|---|---|"] + [f"| {r} | {n} |" for r, n in sorted(rejected.items())] + [""]
    if seeds:
        body += ["## Seeds", "", "| file | rows used |", "|---|---|"]
        body += [f"| {f} | {n} |" for f, n in sorted(seeds.items())] + [""]
    if parents:
        body += ["## Parent datasets", "", "| dataset | fingerprint | records |", "|---|---|---|"]
        body += [f"| {p['name']} | `{p['fingerprint']}` | {p['records']} |" for p in parents] + [""]
    body += ["## Load", "",
             "The default config is the records file alone, in the columns TRL trainers take as they are "
             f"({COLUMNS.get(method, 'see the records')}); `id` and `provenance` ride along as columns, which the "
             "trainers' own column selection leaves out. Drop them with `ds.remove_columns([\"id\", \"provenance\"])`."
             + (f" The `{REJECTED_CONFIG}` config holds every dropped answer with its reason." if rejected else ""),
             "", "```python", "from datasets import load_dataset", "",
             f'ds = load_dataset("data/{name}", split="train")  # the records; rejected.jsonl stays out',
             *([f'rejected = load_dataset("data/{name}", "{REJECTED_CONFIG}", split="train")'] if rejected else []),
             "```", ""]
    return "\n".join(front + body)
