"""`kd`: user tools around the build (checking, inspecting, diffing, auditing, forecasting, sharing the
cache). Stages run through `dvc repro`, not here."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import yaml

from kd.cache import renders
from kd.cache import share as cache_share
from kd.cli.term import Style, emit, printable, say, use_colour
from kd.config import load_params
from kd.config.docs import PARAMS_DOC, params_reference
from kd.errors import KdError
from kd.paths import DATA_DIR, DVC_FILE
from kd.pipeline.check import check
from kd.pipeline.spec import dvc_yaml
from kd.pipeline.status import forecast_failed, status
from kd.pipeline.status import render as render_status
from kd.provenance import audit
from kd.provenance.diff import diff, sides
from kd.provenance.diff import render as render_diff
from kd.records import (
    atomic_write_text,
    dataset_problems,
    fingerprint,
    read_jsonl,
    read_manifest,
    restore_hint,
)
from kd.runtime.models import INFO_FILE
from kd.secrets import redact
from kd.view.app import LOOPBACK, serve


def cmd_check(args: argparse.Namespace) -> int:
    """Validate params.yaml, every template and seed file it names, and dvc.yaml against the stage graph."""
    say(check(Path(args.root)))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Print dvc.yaml as params.yaml makes it (every stage's code, data, templates, seeds, models and keys), or
    write it (--write)."""
    root = Path(args.root)
    text = dvc_yaml(load_params(root), root)
    if not args.write:
        sys.stdout.write(text)
        return 0
    path = root / DVC_FILE
    before = path.read_text(encoding="utf-8") if path.is_file() else None
    if before == text:
        print(f"kd pipeline: {DVC_FILE} is up to date")
        return 0
    atomic_write_text(path, text)
    print(f"kd pipeline: wrote {DVC_FILE} ({len(yaml.safe_load(text)['stages'])} stages)")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    """Print the params.yaml reference generated from the pydantic models, or write docs/params.md (--write)."""
    text = params_reference()
    if not args.write:
        sys.stdout.write(text)
        return 0
    path = Path(args.root) / PARAMS_DOC
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        print(f"kd docs: {PARAMS_DOC} is up to date")
        return 0
    atomic_write_text(path, text)
    print(f"kd docs: wrote {PARAMS_DOC}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Summarise a built dataset and print a few records (or rejections)."""
    path = Path(args.dataset)
    if not path.exists() and (Path(args.root) / DATA_DIR / args.dataset).exists():
        path = Path(args.root) / DATA_DIR / args.dataset
    manifest = read_manifest(path)
    records = read_jsonl(path / manifest["files"]["records"])
    problems = dataset_problems(manifest, records)  # show what is there, not what the manifest claims
    rejected = manifest["rejected"]
    say(f"{manifest['name']} ({manifest['method']}): {len(records)} records, "
        f"{sum(rejected.values())} rejected {json.dumps(rejected) if rejected else ''}")
    say(f"  fingerprint {fingerprint(str(r.get('id')) for r in records)}")
    for problem in problems:
        say(f"  DAMAGED     {problem}")
    if problems:
        say(f"  fix         {restore_hint(path)}")
        return 1
    say(f"  teacher     {json.dumps(manifest['teacher'])}")
    for t in manifest["templates"]:
        say(f"  template    {t['path']}  sha256 {t['sha256'][:12]}")
    rows = read_jsonl(path / manifest["files"]["rejected"]) if args.rejected else records
    width = 100
    for row in rows[: args.n]:
        say()
        if args.rejected:
            say(f"- rejected: {row['reason']}  ({row.get('template', '')})")
            say(textwrap.indent(textwrap.shorten(row.get("text", ""), width * 3, placeholder=" …"), "    "))
            continue
        prov = row["provenance"]
        say(f"- {row['id'][:12]}  {prov['method']}  parents {len(prov['parents'])}  seeds "
            f"{', '.join(s['id'] for s in prov['seeds']) or '-'}")
        for part in ("prompt", "completion", "messages"):
            for msg in row.get(part, []):
                text = textwrap.shorten(msg["content"], width * 3, placeholder=" …")
                say(textwrap.indent(textwrap.fill(f"{msg['role']}: {text}", width), "    "))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Verify every entry of the request cache and the feature cache; damaged or unreadable ones are listed with
    why (and removed with --fix: the next build asks or computes them again)."""
    counts, damaged = cache_share.verify(Path(args.root))
    for d in damaged:
        say(f"damaged {d.kind[:-1]} entry: {d.where} ({d.problem})")
    failed = cache_share.fix(Path(args.root), damaged) if args.fix else []
    for d, why in failed:
        say(f"kd cache: cannot remove {d.where} ({why})", err=True)
    kept = len(failed)
    parts = [f"{kind}: {n} entries, {sum(d.kind == kind for d in damaged)} damaged" for kind, n in counts.items()]
    memo_rows, bad_memo = renders.verify(cache_share.kinds(Path(args.root))[0].local, fix=args.fix)
    print("".join(f"damaged render memo row: {m} (does not match the request key it names)\n" for m in bad_memo), end="")
    parts += [f"render memo: {memo_rows} rows, {len(bad_memo)} damaged{' (removed)' if bad_memo and args.fix else ''}"] \
        if memo_rows else []
    removed = f" ({len(damaged) - kept} removed)" if damaged and args.fix else ""
    print(f"kd cache verify: {'; '.join(parts)}{removed}")
    return 1 if ((damaged or bad_memo) and not args.fix) or kept else 0


def _report(args: argparse.Namespace, report: dict, render) -> None:
    """`--json` for scripts; otherwise text, coloured and paged only on a terminal. Either way the report's text
    (answers, seed rows, template lines) is made printable before it is styled or printed."""
    if args.json:
        try:  # a million-record diff lists tens of thousands of ids: orjson writes them ~10x faster
            import orjson

            text = orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2).decode()
        except (ImportError, TypeError):  # no orjson, or a lone surrogate in the data (orjson refuses it)
            text = json.dumps(report, indent=2, ensure_ascii=False, default=str)
        print(printable(text, as_json=True))
        return
    emit(render(printable(report), Style(use_colour(args.color))), pager=not args.no_pager)


def cmd_diff(args: argparse.Namespace) -> int:
    """Record-level diff of a dataset between two git revisions (default HEAD and the workspace), or of two
    dataset directories; changes are grouped by cause (template, teacher, sampling, upstream record)."""
    root = Path(args.root)
    a, b = sides(root, args.dataset, args.rev_a, args.rev_b)
    report = diff(a, b, root, examples=args.n)
    _report(args, report, lambda r, style: render_diff(r, style, listed=args.list))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Lineage of a record (id or unique prefix; DATASET:PREFIX to narrow) back to its seeds, or what a model
    directory (models/<name>) was trained on."""
    root = Path(args.root)
    target = Path(args.target)
    model_dir = target if target.is_absolute() else root / target
    if (model_dir / INFO_FILE).is_file() or args.target.startswith("models/"):
        _report(args, audit.audit_model(root, model_dir), audit.render_model)
    else:
        _report(args, audit.audit_record(root, args.target), audit.render_record)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """For each generation stage `dvc repro` would run: requests cached vs new, estimated tokens and cost ("≈":
    approximate). Works before the first build: a stage that cannot be forecast yet says why and which stage
    builds what it lacks. Exit 0; 1 only when stages would run and none of them could be forecast."""
    report = status(Path(args.root))
    _report(args, report, render_status)
    return 1 if forecast_failed(report) else 0


def cmd_cache_share(args: argparse.Namespace) -> int:
    """Push or pull request-cache and feature-cache entries through the project's DVC remote (incremental,
    verified). Exit status 1 when any entry was skipped as bad, after everything else has moved."""
    push = args.cache_command == "push"
    result = (cache_share.push if push else cache_share.pull)(Path(args.root), args.remote, args.jobs)
    for kind, key, why in result.rejected:
        say(f"kd cache {args.cache_command}: {kind} {key[:16]}: {why}", err=True)
    words = ("pushed", "already there", "skipped as damaged") if push else ("installed", "already present",
                                                                          "skipped as bad")
    parts = [f"{m.kind}: {m.moved} {words[0]}, {m.already} {words[1]}, {len(m.rejected)} {words[2]}"
             for m in result.kinds]
    say(f"kd cache {args.cache_command} ({'to' if push else 'from'} remote '{result.remote}'): {'; '.join(parts)}")
    return 1 if result.rejected else 0


def cmd_view(args: argparse.Namespace) -> int:
    """A read-only local web app over the project: pipeline, datasets, records with lineage, diffs, models and
    evaluation. Serves 127.0.0.1 only unless --host says otherwise (and then says so: there is no login)."""
    serve(Path(args.root), args.host, args.port)
    return 0


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
    p = sub.add_parser("docs", help=cmd_docs.__doc__)
    p.add_argument("--write", action="store_true", help="write docs/params.md (else print it)")
    p.set_defaults(fn=cmd_docs)
    p = sub.add_parser("pipeline", help=cmd_pipeline.__doc__)
    p.add_argument("--write", action="store_true", help="write dvc.yaml (else print it)")
    p.set_defaults(fn=cmd_pipeline)
    p = sub.add_parser("show", help=cmd_show.__doc__)
    p.add_argument("dataset", help="a dataset name (data/<name>) or directory")
    p.add_argument("-n", type=int, default=3, help="records to print")
    p.add_argument("--rejected", action="store_true", help="print rejections instead of records")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("cache", help="request cache and feature cache tools")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    v = cache_sub.add_parser("verify", help=cmd_cache.__doc__)
    v.add_argument("--fix", action="store_true",
                   help="remove damaged entries (the next build asks or computes them again)")
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
    p = sub.add_parser("status", help=cmd_status.__doc__, description=cmd_status.__doc__)
    _output_options(p)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("view", help=cmd_view.__doc__, description=cmd_view.__doc__)
    p.add_argument("--port", type=int, default=8765, help="the port to serve (default: 8765)")
    p.add_argument("--host", default=LOOPBACK[0], help="the address to bind (default: 127.0.0.1, this machine only)")
    p.set_defaults(fn=cmd_view)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.fn(args))
    except KdError as e:
        say(f"kd: error: {redact(str(e))}", err=True)  # no message may carry a key (kd.secrets)
        sys.exit(2)


if __name__ == "__main__":
    main()
