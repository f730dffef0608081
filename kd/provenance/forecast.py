"""Forecast what a generation stage will ask the teacher, before it asks: requests, tokens, cost.

The method itself runs against a stand-in teacher and a read-only view of the request cache, so the
forecast renders exactly the requests the build would render. A request the cache cannot answer gets a
placeholder answer; whatever is rendered from a placeholder (curation answers to questions not asked yet,
later Self-Instruct rounds whose demos are new generations) is an estimate, marked "≈", and so are counts
of requests asked after any placeholder (how many rounds run depends on the real answers).

A local model that is not built yet (the `teacher` stage, a student used as a generator) has no digest, and
its digest is part of every request key. The forecast then assumes the model whose answers the cache holds
(a fresh clone after `kd cache pull`: the hits are counted, marked "≈"), or, when the cache holds none,
counts every request as new ("≈"). Token counts then come from characters (4 a token), also estimates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.cache.features import FeatureCache, feature_key
from kd.cache.renders import RenderMemo, memo_key, memo_prefix
from kd.cache.store import RequestCache
from kd.config import Params, Price, billed_price
from kd.config.students import tail_temperatures
from kd.errors import KdError
from kd.paths import CACHE_DIR, under
from kd.prompts import Prompt
from kd.provenance.lineage import iter_lines, loads
from kd.runtime.ask import Asker, Call
from kd.runtime.local import LocalTeacher
from kd.runtime.plan import Calibration, Plan
from kd.runtime.roles import Role, role_identity, roles
from kd.runtime.served import feature_teacher
from kd.runtime.tokenize import encode

MARK = "kdforecastplaceholder"  # one token no seed or template contains; survives novelty and word filters
DEFAULT_CHARS_PER_TOKEN = 4.0


def _placeholder(key: str) -> str:
    # distinct words per request, so placeholders pass ROUGE-L novelty against each other
    return MARK + " " + " ".join(key[i:i + 6] for i in range(0, 48, 6))


class _Blind:
    """Shared by every role of one forecast: once any placeholder is handed out, later requests are guesses."""

    handed_out = False


class _StandIn:
    """A Teacher (kd.runtime.teachers protocol) that answers nothing: it counts what it is asked (running totals,
    not the requests: a forecast of a million requests holds no more than one of a hundred) and returns
    placeholders."""

    name = "forecast"

    def __init__(self, identity: dict[str, Any], blind: _Blind) -> None:
        self._identity, self.blind = identity, blind
        self.chars = 0  # prompt characters of the requests asked
        self.caps: dict[int, int] = {}  # max_tokens -> requests asked with it (scoring requests generate nothing)
        self.estimated = 0  # rendered from a placeholder: counts that depend on answers not known yet

    @property
    def identity(self) -> dict[str, Any]:
        return self._identity

    def generate(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        self.blind.handed_out = True
        for key, request in items:
            self.chars += _chars(request.get("messages") or []) + len(request.get("completion") or "")
            if "sampling" in request:
                cap = request["sampling"]["max_tokens"]
                self.caps[cap] = self.caps.get(cap, 0) + 1
            self.estimated += MARK in json.dumps(request)
            # no "score": judges treat a placeholder as unscored (kd.runtime.judges)
            on_result(key, {"text": _placeholder(key), "finish_reason": "stop",
                            "usage": {"prompt_tokens": 0, "completion_tokens": 0}})


class _Peek:
    """The request cache, read-only: a forecast never writes, removes or repairs entries."""

    def __init__(self, cache: Any, blind: _Blind) -> None:
        self.cache, self.blind = cache, blind
        self.dir = getattr(cache, "dir", None)
        self.hits = Calibration()
        self.after_blind = 0

    def get(self, key: str) -> dict[str, Any] | None:
        if self.blind.handed_out:
            self.after_blind += 1
        entry = self.cache.get_entry(key)
        if entry is None:
            return None
        usage = entry["response"]["usage"]
        self.hits.add(_chars(entry["request"].get("messages") or []), usage["prompt_tokens"], usage["completion_tokens"])
        return entry["response"]

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        pass

    def ensure_writable(self) -> None:
        pass  # a forecast writes nothing, so a read-only cache is no reason to refuse one


@dataclass
class Forecast:
    dataset: str
    method: str
    teacher: str
    requests: int = 0  # distinct requests the build would make, cached or not
    cached: int = 0
    new: int = 0  # would go to the teacher
    estimated: int = 0  # of `new`: rendered from answers not known yet
    approximate: bool = False  # counts depend on unknown answers, or on a stale upstream dataset
    prompt_tokens: int = 0  # estimated, new requests only
    completion_tokens: int = 0
    cost: float | None = 0.0  # None: a remote teacher without a price in params
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """`sft: forecast 12 new teacher requests (54 cached); est. 1.2k + 3.4k tokens, $0.0031`."""
        a = "≈" if self.approximate else ""
        split = f"; {self.new - self.estimated} exact, ≈{self.estimated} rendered from answers not known yet" \
            if self.estimated else ""
        what = "records to score" if self.method == "feature" else "new teacher requests"
        return (f"{self.dataset}: forecast {a}{self.new} {what} ({a}{self.cached} cached{split}); est. "
                f"{_k(self.prompt_tokens)} prompt + {_k(self.completion_tokens)} completion tokens, "
                f"{money(self.cost)}" + "".join(f"; {n}" for n in self.notes))

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _k(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def money(cost: float | None) -> str:
    if cost is None:
        return "cost unknown (no price in params)"
    return "free" if cost == 0 else f"${cost:.4f}" if cost < 1 else f"${cost:,.2f}"


def cost_of(params: Params, teacher: str, prompt_tokens: float, completion_tokens: float) -> float | None:
    """Cost from `teachers.<name>.price`; a local teacher without a price is free, a remote one unknown."""
    cfg = params.teachers[teacher]
    price: Price | None = billed_price(cfg)  # a batch teacher's discount applied
    if price is None:
        return 0.0 if cfg.backend == "local" else None
    return price.cost(prompt_tokens, completion_tokens)


def forecast(name: str, params: Params, root: Path, cache: Any, run: Any, data_dir: Path) -> Forecast:
    """Run `run(askers)` (the method, one Asker per role of kd.runtime.scoring.roles) against stand-in
    teachers and the read-only cache; see the module doc."""
    cfg = params.datasets[name]
    if cfg.method == "feature":
        return feature_forecast(name, params, root, data_dir, getattr(cache, "dir", None))
    rs = roles(cfg)
    blind = _Blind()
    identities = {r: _identity(role, params, root, getattr(cache, "dir", None)) for r, role in rs.items()}
    stand_ins = {r: _StandIn(identity, blind) for r, (identity, _) in identities.items()}
    peeks = {r: _Peek(cache, blind) for r in rs}
    askers = {r: Asker(stand_ins[r], peeks[r], f"{name} {r} (forecast)") for r in rs}  # type: ignore[arg-type]
    run(askers)
    fc = Forecast(name, cfg.method, "+".join(sorted({role.teacher or role.path or "?" for role in rs.values()})))
    for r, role in rs.items():
        asker, asked = askers[r], stand_ins[r]
        fc.cached += asker.cached
        fc.new += asker.new
        fc.estimated += asked.estimated
        fc.approximate = fc.approximate or peeks[r].after_blind > 0
        if note := identities[r][1]:
            fc.approximate = True
            fc.notes.append(note)
        prompt, completion = _tokens(asker.new, asked.chars, asked.caps, peeks[r].hits, params, role.teacher, root)
        fc.prompt_tokens += prompt
        fc.completion_tokens += completion
        cost = cost_of(params, role.teacher, prompt, completion) if role.teacher else 0.0  # a reward model is yours
        fc.cost = None if fc.cost is None or cost is None else fc.cost + cost
    fc.requests = fc.cached + fc.new
    fc.approximate = fc.approximate or fc.estimated > 0
    return fc


def planned(name: str, params: Params, root: Path, cache: Any, prompt: Prompt, items: Iterable[Any],
            render: Callable[[Asker, Any], Call], values: Callable[[Any], tuple[int, tuple[str, ...]]],
            spool: bool) -> tuple[Forecast, Plan]:
    """The forecast of a method whose requests do not depend on answers (labeling): its items planned once
    (kd.runtime.plan), exact. `values(item)`: its sample index and the values its template gets, for the render
    memo (kd.cache.renders): an unchanged item is not rendered again. `spool`: keep the uncached requests for
    the build to send (and write the memo); the build then reuses this pass instead of rendering and reading
    the cache again."""
    cfg = params.datasets[name]
    role = roles(cfg)["teacher"]
    identity, note = _identity(role, params, root, getattr(cache, "dir", None))
    asker = Asker(_StandIn(identity, _Blind()), cache, name)  # renders only: `call` needs the identity
    prefix = memo_prefix(prompt.provenance(), identity, cfg.sampling.model_dump())

    def memo_of(item: Any) -> bytes:
        sample, vals = values(item)
        return memo_key(prefix, sample, vals)

    memo = RenderMemo(cache.dir, writable=spool) if getattr(cache, "dir", None) is not None else None
    plan = Plan(cache, identity, lambda item: render(asker, item), memo_of, memo, spool)
    try:
        for item in items:
            plan.add(item)
        plan.close()
    except BaseException:
        plan.discard()
        raise
    fc = Forecast(name, cfg.method, role.teacher or "?", requests=plan.cached + plan.new, cached=plan.cached,
                  new=plan.new)
    if note:
        fc.approximate = True
        fc.notes.append(note)
    fc.prompt_tokens, fc.completion_tokens = _tokens(plan.new, plan.new_chars, plan.new_caps, plan.hits, params,
                                                     role.teacher, root)
    fc.cost = cost_of(params, role.teacher, fc.prompt_tokens, fc.completion_tokens)
    return fc, plan


def _tokens(asked: int, chars: int, caps: dict[int, int], hits: Calibration, params: Params, teacher: str | None,
            root: Path) -> tuple[int, int]:
    """Estimated (prompt, completion) tokens of the `asked` requests a role would send, from their prompt
    characters and their max_tokens.

    The evidence is what the stage itself will see when it prints this forecast: this forecast's cache hits,
    not the dataset's last build (DVC deletes it before the stage runs, so `kd status` and the stage would
    disagree). A request's completion never counts more than its `max_tokens`.
    """
    if not asked:
        return 0, 0
    per_token = hits.chars_per_token() or _tokenizer_ratio(params, teacher, root)
    completion = hits.mean_completion()
    completion_tokens = sum(n * round(min(completion, cap) if completion is not None else cap / 2)
                            for cap, n in caps.items())
    return round(chars / per_token), completion_tokens


def _chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(m.get("content", "")) for m in messages)


def _identity(role: Role, params: Params, root: Path, cache_dir: Path | None) -> tuple[dict[str, Any], str | None]:
    """The identity a role's request keys carry, and a note when it is assumed: a local model directory that is
    not built yet has no digest (see the module doc)."""
    if role.kind == "reward":
        if (root / role.path).is_dir():
            return role_identity(role, params, root), None
        return ({"backend": "reward_model", "model": Path(role.path).name, "digest": None},
                f"{role.path} is not built yet: its digest is part of every request key, so all its requests count as new")
    cfg = params.teachers[role.teacher]
    if cfg.backend != "local" or under(root, cfg.path).is_dir():
        return role_identity(role, params, root), None
    shape = {"backend": "local", "model": under(root, cfg.path).name, "revision": cfg.revision,
             "dtype": LocalTeacher(role.teacher, cfg, root).dtype_name}
    known = _cached_identities(cache_dir, shape)
    if len(known) == 1:
        identity = known[0]
        return identity, (f"{cfg.path} is not built yet: keys assume it will be the model whose answers the cache "
                          f"holds (digest {str(identity.get('digest'))[:12]})")
    like = f"a {shape['dtype']} model named {shape['model']}"  # a bf16 machine's answers do not serve a float32 one
    why = f"the cache holds answers of several {like}" if known else f"the cache holds no answers of {like}"
    return ({**shape, "digest": None},
            f"{cfg.path} is not built yet and {why}: its digest is part of every request key, so all requests "
            f"count as new, their tokens at {DEFAULT_CHARS_PER_TOKEN:g} characters each")


def _cached_identities(cache_dir: Path | None, shape: dict[str, Any]) -> list[dict[str, Any]]:
    """Distinct teacher identities in the request cache that match `shape` in everything but the digest (from the
    cache's teacher column: no entry is read)."""
    known = RequestCache(cache_dir).teachers() if cache_dir is not None else []
    return [i for i in known if isinstance(i, dict) and all(i.get(k) == v for k, v in shape.items())]


def _tokenizer_ratio(params: Params, teacher: str | None, root: Path) -> float:
    cfg = params.teachers[teacher] if teacher else None
    path = root / cfg.path if cfg is not None and cfg.backend == "local" else None
    if path is None or not (path / "tokenizer.json").is_file():
        return DEFAULT_CHARS_PER_TOKEN
    try:
        from tokenizers import Tokenizer  # the fast tokenizer alone: no transformers import

        sample = "The quick brown fox explains, step by step, why 15% of 240 is 36. " * 8
        return len(sample) / len(Tokenizer.from_file(str(path / "tokenizer.json")).encode(sample).ids)
    except Exception:  # a tokenizer we cannot read only makes the estimate rougher
        return DEFAULT_CHARS_PER_TOKEN


def feature_forecast(name: str, params: Params, root: Path, data_dir: Path, cache_dir: Path | None) -> Forecast:
    """Feature datasets score every record of their input dataset with the local teacher, one forward pass
    each. Exact: the same cache keys the feature stage computes (the teacher's tokenizer through
    kd.runtime.tokenize.encode), looked up in its cache; tokens are the real token counts."""
    cfg = params.datasets[name]
    tcfg = params.teachers[cfg.teacher]
    path = data_dir / cfg.dataset / "records.jsonl"
    fc = Forecast(name, "feature", cfg.teacher)
    # the keys need the teacher's tokenizer and digest, and the records to score: no guess is worth printing
    local = tcfg.path if tcfg.backend == "local" else tcfg.tokenizer  # the served teacher's: validation sets it
    lacking = [str(p) for p, there in ((f"data/{cfg.dataset}", path.is_file()),
                                       (local, under(root, local).is_dir())) if not there]
    if lacking:
        raise KdError(f"datasets.{name}: {' and '.join(lacking)} not built yet")
    teacher = feature_teacher(cfg.teacher, tcfg, root)
    tok, identity = teacher.tokenizer(), teacher.identity
    cache = FeatureCache.within(cache_dir or root / CACHE_DIR)
    temperatures = tail_temperatures(params.students, name)  # part of the key, as the stage computes it
    for line in iter_lines(path.read_bytes()):
        try:
            ids, start = encode(tok, loads(line), cfg.max_length)
        except KdError:
            continue  # rejected by the stage too
        if start >= len(ids):
            continue
        if cache.path(feature_key(identity, ids, cfg.top_k, temperatures)).exists():
            fc.cached += 1
        else:
            fc.new += 1
            fc.prompt_tokens += len(ids)
    fc.requests = fc.cached + fc.new
    fc.cost = cost_of(params, cfg.teacher, fc.prompt_tokens, 0)
    return fc
