"""What looks like a secret: one definition for params validation, MLflow params and error messages.

Keys belong in environment variables (`api_key_env` names the variable); nothing kd writes or prints may hold
one. Three shapes are recognised: a params key whose value is a credential (`api_key`, `hf_token`), a value
shaped like a well-known credential (`sk-…`, `gsk_…`, `AIza…`), and a URL carrying credentials (user:password@
or a credential-like parameter in its query, a path segment's matrix parameters or its fragment). `redact`
replaces each with `***` so a message can still name the thing.

Besides shapes, the key values kd holds in memory (read from the environment: kd.runtime.openai) are `remember`ed,
and `redact` / `scrub_known` remove them in every encoding a server may echo them in: raw, JSON-escaped (`\\/`,
`\\u002d`, any mix of escaped and plain characters, escaped twice), percent-encoded (either hex case, `+` for a space,
encoded twice), HTML character references, hex, and base64 (standard and URL-safe, at any alignment inside a longer
encoded text, so `base64("user:" + key)` of Basic auth too). A server's text never lands anywhere (terminal,
rejected.jsonl, the request cache, MLflow) without going through one of them.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qsl, unquote, urlsplit

# The last part of a key: `api_key`, `secret`, `password`, `token` or `*_token` (but not `max_tokens`).
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|(^|[_-])token)$", re.IGNORECASE)
# A URL parameter (query, matrix `;name=`, fragment) that carries a credential: the above, `key`, `x-api-key`,
# `auth`/`authorization`, `sig`(nature) (S3/GCS/Azure presigned URLs), `session`/`sessionid`/`sid`, `jwt`,
# `credential(s)`, `passwd`/`pwd`, `pat`, `code` (an OAuth grant).
SECRET_QUERY = re.compile(r"(api[_-]?key|secret|passw(or)?d|token|session([_-]?id)?|credentials?|auth(ori[sz]ation)?"
                          r"|signature|(^|[_-])(key|sig|sid|jwt|pat|pwd|code))$", re.IGNORECASE)
# Values shaped like well-known credentials: OpenAI/Anthropic `sk-…`, Hugging Face `hf_…`, Groq `gsk_…`, Google
# `AIza…`, GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, a bearer token.
SECRET_VALUE = re.compile(r"(?<![A-Za-z0-9])(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gsk_[A-Za-z0-9]{20,}"
                          r"|AIza[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
                          r"|xox[abprs]-[A-Za-z0-9\-]{10,}|Bearer\s+\S{16,})")
# The user:password@ (or token@) part of a URL anywhere in a text.
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#]+@")
# `name=value` in a query string, for redaction in free text.
QUERY_PARAM = re.compile(r"(?P<sep>[?&;#])(?P<name>[^=&#;?\s]+)=(?P<value>[^&#;\s]*)")
# What a key typed where a variable *name* belongs looks like: a long run of letters and digits with both in it
# (a 64-hex token, a base62 key), besides the shapes above. Variable names are words joined by underscores.
KEY_LIKE = re.compile(r"[0-9a-fA-F]{32,}|(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """A params or MLflow key whose value would be a credential."""
    return bool(SECRET_KEY.search(key))


def url_has_secret(value: str) -> bool:
    """A URL with credentials in it: user info (`user:pass@host`, `token@host`), a credential-shaped value anywhere,
    or a parameter named like a credential, with a value, in the query (`?sessionid=`), in a path segment's matrix
    parameters (`/v1;token=`) or in the fragment (`#access_token=`). Names are compared percent-decoded."""
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc:
        return False
    if "@" in parts.netloc or SECRET_VALUE.search(unquote(value)):
        return True
    params = parse_qsl(parts.query, keep_blank_values=True) + parse_qsl(parts.fragment, keep_blank_values=True)
    params += [tuple(p.split("=", 1)) for seg in parts.path.split("/") for p in seg.split(";")[1:] if "=" in p]
    params += [tuple(p.split("=", 1)) for p in parts.netloc.split(";")[1:] if "=" in p]
    return any(SECRET_QUERY.search(unquote(name).strip()) and v for name, v in params)


def looks_secret(value: str) -> bool:
    """A value shaped like a credential, or a URL carrying one, wherever it appears."""
    return bool(SECRET_VALUE.search(value)) or url_has_secret(value)


def looks_like_key(name: str) -> bool:
    """A value given where an environment variable *name* belongs that is a key itself (`gsk_…`, 64 hex)."""
    return looks_secret(name) or bool(KEY_LIKE.search(name))


def why_refused(key: str, value: str) -> str:
    """Why a params value that looks like a credential is refused, in words that show none of it."""
    if key == "api_key_env":
        return ("must name an environment variable; the value looks like an API key itself — put the key in the "
                "environment")
    if url_has_secret(value):
        return (f"{redact(value)}: credentials in a URL are refused (params are written to dvc.lock and shown in "
                f"errors); put the key in an environment variable and name it with `api_key_env`")
    return "looks like a secret; keep keys in an environment variable and name it with `api_key_env`"


def redact(text: str) -> str:
    """`text` with every credential in it replaced by `***`: the keys kd holds (`remember`) in every encoding,
    credential-shaped values, the user info of URLs and the values of key-like URL parameters. What is left still
    names the thing (`http://***@host/v1`)."""
    text = SECRET_VALUE.sub(REDACTED, scrub_known(text))
    text = USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return QUERY_PARAM.sub(lambda m: f"{m['sep']}{m['name']}={REDACTED}" if SECRET_QUERY.search(unquote(m["name"]))
                           and m["value"] else m[0], text)


# Known values shorter than this are placeholders (`EMPTY`, `none`: what keyless vLLM/Ollama servers take), not
# secrets; scrubbing them would rewrite ordinary words in answers.
MIN_KNOWN_CHARS = 8
_known: dict[str, re.Pattern[str]] = {}  # secret value -> the regex matching it in any encoding


def remember(value: str) -> None:
    """From now on, scrub `value` (a key read from the environment) from everything `redact`/`scrub_known` see.

    A process-wide set on purpose: a message may reach the terminal far from the object that holds the key
    (kd.stage prints any KdError), and it must be scrubbed there too. One pattern per key (~10 ms to compile):
    a process holds a key or two."""
    if len(value) < MIN_KNOWN_CHARS or value in _known:
        return
    source, firsts = _encodings(value)
    # the lookahead on the possible first characters makes a miss cheap: ~20 µs for a 1 KB answer, not ~40
    _known[value] = re.compile(f"(?=[{re.escape(''.join(sorted(firsts)))}])(?:{source})")


def scrub_known(text: str) -> str:
    """`text` with every remembered key replaced by `***`, in whatever encoding (see the module docstring)."""
    for pattern in _known.values():
        text = pattern.sub(REDACTED, text)
    return text


def scrub_known_bytes(data: bytes) -> bytes:
    """`scrub_known` for a body of bytes; the same object back when nothing was found (answers stay byte-exact)."""
    if not _known or not data:
        return data
    text = data.decode("utf-8", "surrogateescape")
    scrubbed = scrub_known(text)
    return data if scrubbed is text or scrubbed == text else scrubbed.encode("utf-8", "surrogateescape")


def _hex_class(code: int, width: int) -> str:
    """`2[dD]`: the hex digits of `code`, either case, for a regex."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in f"{code:0{width}x}")


def _char(c: str) -> str:
    """A regex matching one character plain or escaped in any of the ways a server may echo it; mixed freely along
    the key, so a partly escaped key (`sk\\u002dab`, `sk%2Dab`) matches too. Backslashes and `%25` may repeat
    (text escaped twice: JSON in JSON, percent-encoding of a percent-encoded URL)."""
    code = ord(c)
    utf8 = c.encode("utf-8")
    forms = [re.escape(c), r"\\+u" + _hex_class(code, 4) if code < 0x10000 else re.escape(c),
             "".join(r"%(?:25)*" + _hex_class(b, 2) for b in utf8), rf"&#0*{code};", rf"&#[xX]0*{_hex_class(code, 1)};"]
    if code < 0x100:
        forms.append(r"\\+x" + _hex_class(code, 2))
    if c in "/\\\"'":
        forms.append(r"\\+" + re.escape(c))
    if c == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


def _encodings(value: str) -> tuple[str, set[str]]:
    """Regex source matching `value` raw or escaped character by character, as hex, or as base64; and the
    characters a match can start with."""
    data = value.encode("utf-8")
    forms = ["".join(_char(c) for c in value), re.escape(data.hex()), re.escape(data.hex().upper())]
    firsts = {value[0], "\\", "%", "&", data.hex()[0], data.hex().upper()[0]}
    for pad in range(3):  # the base64 of `value` inside a longer text starts at one of three alignments
        encoded = base64.b64encode(b"\0" * pad + data).decode()
        # drop the characters that depend on the bytes around `value` (the first and a partial last group)
        core = encoded[4 if pad else 0: len(encoded) - (4 if (pad + len(data)) % 3 else 0)]
        if len(core) >= 8:
            safe = core.translate(str.maketrans("+/", "-_"))
            forms += [re.escape(core), re.escape(safe)]
            firsts |= {core[0], safe[0]}
    return "|".join(f"(?:{f})" for f in forms), firsts


def endpoint(url: str) -> str:
    """`scheme://host[:port]` of a URL: where requests went, without credentials, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: show none rather than fail while recording provenance
        port = ""
    return f"{parts.scheme}://{host}{port}"
