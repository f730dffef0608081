"""`kd`: user tools around the build (checking, inspecting). Stages run through `dvc repro`, not here."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

from kd.errors import KdError

_STAGE_CMD = re.compile(r"stages/(labeling|expansion|curation|feature)\.py\s+(\S+)")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate params.yaml, every template and seed file it names, and dvc.yaml's deps against them."""
    import yaml

    from kd.config import load_params
    from kd.elicit.build import files_read
    from kd.elicit.common import load_seeds

    root = Path(args.root)
    params = load_params(root)
    problems: list[str] = []
    reads = {}
    for name, cfg in params.datasets.items():
        try:
            reads[name] = files_read(cfg, params, root)
            for f in reads[name]["seeds"]:
                load_seeds(root, f, ())
        except KdError as e:
            problems.append(f"datasets.{name}: {e}")
    dvc_file = root / "dvc.yaml"
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}) if dvc_file.exists() else {}
    staged = set()
    for stage, spec in stages.items():
        m = _STAGE_CMD.search(str(spec.get("cmd", "")))
        if not m:
            continue
        method, name = m.groups()
        staged.add(name)
        if name not in params.datasets:
            problems.append(f"dvc.yaml: stages.{stage} builds '{name}', which params.yaml does not declare")
            continue
        if params.datasets[name].method != method:
            problems.append(f"dvc.yaml: stages.{stage} runs stages/{method}.py but datasets.{name}.method is "
                            f"'{params.datasets[name].method}'")
        if name not in reads:
            continue
        deps = {str(d) for d in spec.get("deps", [])}
        for kind in ("templates", "seeds", "datasets", "teacher"):
            for f in reads[name][kind]:
                if f not in deps:
                    problems.append(f"dvc.yaml: stages.{stage}.deps lacks {f} (datasets.{name} reads it; "
                                    f"without it an edit would not rerun the stage)")
        declared = {str(p) for p in spec.get("params", []) if isinstance(p, str)}
        for key in [f"datasets.{name}", *reads[name]["params"]]:
            if key not in declared:
                problems.append(f"dvc.yaml: stages.{stage}.params lacks {key}")
        outs = {str(next(iter(o))) if isinstance(o, dict) else str(o) for o in spec.get("outs", [])}
        if f"data/{name}" not in outs:
            problems.append(f"dvc.yaml: stages.{stage}.outs lacks data/{name}")
    for name in params.datasets:
        if stages and name not in staged:
            print(f"kd: note: datasets.{name} has no stage in dvc.yaml; `dvc repro` will not build it",
                  file=sys.stderr)
    if problems:
        raise KdError("\n".join(problems))
    n_templates = len({t for r in reads.values() for t in r["templates"]})
    print(f"kd check: params.yaml OK ({len(params.teachers)} teachers, {len(params.datasets)} datasets, "
          f"{n_templates} templates); dvc.yaml deps match")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Summarise a built dataset and print a few records (or rejections)."""
    from kd.records import read_dataset, read_jsonl

    path = Path(args.dataset)
    if not path.exists() and (Path(args.root) / "data" / args.dataset).exists():
        path = Path(args.root) / "data" / args.dataset
    manifest, records = read_dataset(path)
    rejected = manifest["rejected"]
    print(f"{manifest['name']} ({manifest['method']}): {manifest['records']} records, "
          f"{sum(rejected.values())} rejected {json.dumps(rejected) if rejected else ''}")
    print(f"  fingerprint {manifest['fingerprint']}")
    print(f"  teacher     {json.dumps(manifest['teacher'])}")
    for t in manifest["templates"]:
        print(f"  template    {t['path']}  sha256 {t['sha256'][:12]}")
    rows = read_jsonl(path / manifest["files"]["rejected"]) if args.rejected else records
    width = 100
    for row in rows[: args.n]:
        print()
        if args.rejected:
            print(f"- rejected: {row['reason']}  ({row.get('template', '')})")
            print(textwrap.indent(textwrap.shorten(row.get("text", ""), width * 3, placeholder=" …"), "    "))
            continue
        prov = row["provenance"]
        print(f"- {row['id'][:12]}  {prov['method']}  parents {len(prov['parents'])}  seeds "
              f"{', '.join(s['id'] for s in prov['seeds']) or '-'}")
        for part in ("prompt", "completion", "messages"):
            for msg in row.get(part, []):
                text = textwrap.shorten(msg["content"], width * 3, placeholder=" …")
                print(textwrap.indent(textwrap.fill(f"{msg['role']}: {text}", width), "    "))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Verify every entry of the request cache; damaged ones are listed (and removed with --fix)."""
    from kd.cache import DEFAULT_DIR, RequestCache, _check

    cache = RequestCache(Path(args.root) / DEFAULT_DIR)
    total, bad = 0, []
    for f in sorted(cache.dir.glob("*/*.json")) if cache.dir.exists() else []:
        total += 1
        if problem := _check(f.read_bytes(), f.stem):
            bad.append((f, problem))
    for f, problem in bad:
        print(f"damaged: {f} ({problem})")
        if args.fix:
            f.unlink()
    print(f"kd cache: {total} entries, {len(bad)} damaged" + (" (removed)" if bad and args.fix else ""))
    return 1 if bad and not args.fix else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd", description=__doc__)
    parser.add_argument("--root", default=".", help="the project directory (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help=cmd_check.__doc__)
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("show", help=cmd_show.__doc__)
    p.add_argument("dataset", help="a dataset name (data/<name>) or directory")
    p.add_argument("-n", type=int, default=3, help="records to print")
    p.add_argument("--rejected", action="store_true", help="print rejections instead of records")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("cache", help="request cache tools")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    v = cache_sub.add_parser("verify", help=cmd_cache.__doc__)
    v.add_argument("--fix", action="store_true", help="remove damaged entries (they are re-asked on the next build)")
    v.set_defaults(fn=cmd_cache)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.fn(args))
    except KdError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
