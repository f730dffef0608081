"""`kd`: user tools around the build (checking, inspecting, diffing, auditing, forecasting, sharing the
cache). Stages run through `dvc repro`, not here."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

from kd.errors import KdError

_STAGE_CMD = re.compile(r"stages/(labeling|expansion|curation|feature|feedback|self_knowledge)\.py\s+(\S+)")
_STUDENT_CMD = re.compile(r"stages/student\.py\s+(\S+)")
_REWARD_CMD = re.compile(r"stages/reward_model\.py\s+(\S+)")


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
        problems += _check_student_stage(stage, spec, params, root)
        problems += _check_reward_stage(stage, spec, params, root)
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
        deps = {str(d) for d in spec.get("deps") or []}
        for kind in ("templates", "seeds", "datasets", "teacher"):
            for f in reads[name][kind]:
                if f not in deps:
                    problems.append(f"dvc.yaml: stages.{stage}.deps lacks {f} (datasets.{name} reads it; "
                                    f"without it an edit would not rerun the stage)")
        declared = {str(p) for p in spec.get("params") or [] if isinstance(p, str)}
        for key in [f"datasets.{name}", *reads[name]["params"]]:
            if key not in declared:
                problems.append(f"dvc.yaml: stages.{stage}.params lacks {key}")
        outs = {str(next(iter(o))) if isinstance(o, dict) else str(o) for o in spec.get("outs") or []}
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


def _check_student_stage(stage: str, spec: dict, params: object, root: Path) -> list[str]:
    """A student stage must list the data, models and params keys its student reads."""
    m = _STUDENT_CMD.search(str(spec.get("cmd", "")))
    if not m:
        return []
    name = m.group(1)
    if name not in params.students:
        return [f"dvc.yaml: stages.{stage} trains '{name}', which params.yaml does not declare under students"]
    from kd.distill.train import dvc_stage

    return _missing(stage, spec, dvc_stage(name, params, root), f"students.{name}")


def _check_reward_stage(stage: str, spec: dict, params: object, root: Path) -> list[str]:
    """A reward-model stage must list the data, models and params keys its reward model reads."""
    m = _REWARD_CMD.search(str(spec.get("cmd", "")))
    if not m:
        return []
    name = m.group(1)
    if name not in params.reward_models:
        return [f"dvc.yaml: stages.{stage} trains '{name}', which params.yaml does not declare under reward_models"]
    from kd.distill.reward import reward_dvc_stage

    return _missing(stage, spec, reward_dvc_stage(name, params, root), f"reward_models.{name}")


def _missing(stage: str, spec: dict, expected: dict, key: str) -> list[str]:
    """The data/model deps and params keys of `expected` (the stage kd would write) that `spec` lacks."""
    deps = {str(d) for d in spec.get("deps") or []}
    declared = {str(p) for p in spec.get("params") or [] if isinstance(p, str)}
    out = [f"dvc.yaml: stages.{stage}.deps lacks {d} ({key} reads it)"
           for d in expected["deps"] if d.startswith(("data/", "models/")) and d not in deps]
    out += [f"dvc.yaml: stages.{stage}.params lacks {k}" for k in expected["params"] if k not in declared]
    return out


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


def _report(args: argparse.Namespace, report: dict, render) -> None:
    """`--json` for scripts; otherwise text, coloured and paged only on a terminal."""
    from kd.term import Style, emit, use_colour

    if args.json:
        try:  # a million-record diff lists tens of thousands of ids: orjson writes them ~10x faster
            import orjson

            print(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2).decode())
        except ImportError:
            print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
        return
    emit(render(report, Style(use_colour(args.color))), pager=not args.no_pager)


def cmd_diff(args: argparse.Namespace) -> int:
    """Record-level diff of a dataset between two git revisions (default HEAD and the workspace), or of two
    dataset directories; changes are grouped by cause (template, teacher, sampling, upstream record)."""
    from kd.diff import diff, render, sides

    root = Path(args.root)
    a, b = sides(root, args.dataset, args.rev_a, args.rev_b)
    report = diff(a, b, root, examples=args.n)
    _report(args, report, lambda r, style: render(r, style, listed=args.list))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Lineage of a record (id or unique prefix; DATASET:PREFIX to narrow) back to its seeds, or what a model
    directory (models/<name>) was trained on."""
    from kd import audit

    root = Path(args.root)
    target = Path(args.target)
    model_dir = target if target.is_absolute() else root / target
    if (model_dir / audit.MODEL_FILE).is_file() or args.target.startswith("models/"):
        _report(args, audit.audit_model(root, model_dir), audit.render_model)
    else:
        _report(args, audit.audit_record(root, args.target), audit.render_record)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """For each generation stage `dvc repro` would run: requests cached vs new, estimated tokens and cost."""
    from kd.status import render, status

    _report(args, status(Path(args.root)), render)
    return 0


def cmd_cache_share(args: argparse.Namespace) -> int:
    """Push or pull request-cache entries through the project's DVC remote (incremental, verified)."""
    from kd import cache_share

    fn = cache_share.push if args.cache_command == "push" else cache_share.pull
    result = fn(Path(args.root), args.remote, args.jobs)
    for key, why in result.rejected:
        print(f"kd cache {args.cache_command}: {key[:16]}: {why}", file=sys.stderr)
    verb = "pushed to" if args.cache_command == "push" else "pulled from"
    print(f"kd cache {args.cache_command}: {result.moved} entries {verb} remote '{result.remote}', "
          f"{result.already} already there, {len(result.rejected)} rejected")
    return 1 if result.rejected else 0


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour (auto: on a terminal)")
    p.add_argument("--no-pager", action="store_true", help="do not page long output through $PAGER")


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
    for verb, where in (("push", "to"), ("pull", "from")):
        c = cache_sub.add_parser(verb, help=f"copy entries the other side lacks {where} the DVC remote")
        c.add_argument("-r", "--remote", default=None, help="a DVC remote name (default: the project's default)")
        c.add_argument("-j", "--jobs", type=int, default=8, help="parallel transfers")
        c.set_defaults(fn=cmd_cache_share)
    p = sub.add_parser("diff", help="record-level diff of a dataset between revisions, grouped by cause")
    p.add_argument("dataset", help="data/<name> (or a dataset directory, with a second directory after it)")
    p.add_argument("rev_a", nargs="?", help="the old git revision (default HEAD), or a second dataset directory")
    p.add_argument("rev_b", nargs="?", help="the new git revision (default: the workspace)")
    p.add_argument("-n", type=int, default=3, help="changed records to show with prompt and output diffs")
    p.add_argument("--list", type=int, default=5, help="added/removed records to list")
    _output_options(p)
    p.set_defaults(fn=cmd_diff)
    p = sub.add_parser("audit", help="lineage of a record back to its seeds, or what a model was trained on")
    p.add_argument("target", help="a record id or unique prefix (DATASET:PREFIX), or a model directory")
    _output_options(p)
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("status", help=cmd_status.__doc__)
    _output_options(p)
    p.set_defaults(fn=cmd_status)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.fn(args))
    except KdError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
