"""What looks like a secret: one definition for params validation, MLflow params and error messages.

Keys belong in environment variables (`api_key_env` names the variable); nothing kd writes or prints may hold
one. Three shapes are recognised: a params key whose value is a credential (`api_key`, `hf_token`), a value
shaped like a well-known credential (`sk-…`, `gsk_…`, `AIza…`), and a URL carrying credentials (user:password@
or a `?key=` / `?token=` query value). `redact` replaces each with `***` so a message can still name the thing.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

# The last part of a key: `api_key`, `secret`, `password`, `token` or `*_token` (but not `max_tokens`).
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|(^|[_-])token)$", re.IGNORECASE)
# A URL query parameter that carries a credential: the above, or `key`, `x-api-key`, `auth`, `sig`(nature).
SECRET_QUERY = re.compile(r"(api[_-]?key|secret|password|token|(^|[_-])(key|auth|sig|signature|pat))$",
                          re.IGNORECASE)
# Values shaped like well-known credentials: OpenAI/Anthropic `sk-…`, Hugging Face `hf_…`, Groq `gsk_…`, Google
# `AIza…`, GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, a bearer token.
SECRET_VALUE = re.compile(r"(?<![A-Za-z0-9])(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gsk_[A-Za-z0-9]{20,}"
                          r"|AIza[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
                          r"|xox[abprs]-[A-Za-z0-9\-]{10,}|Bearer\s+\S{16,})")
# The user:password@ (or token@) part of a URL anywhere in a text.
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#]+@")
# `name=value` in a query string, for redaction in free text.
QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#\s]+)=(?P<value>[^&#\s]*)")
# What a key typed where a variable *name* belongs looks like: a long run of letters and digits with both in it
# (a 64-hex token, a base62 key), besides the shapes above. Variable names are words joined by underscores.
KEY_LIKE = re.compile(r"[0-9a-fA-F]{32,}|(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """A params or MLflow key whose value would be a credential."""
    return bool(SECRET_KEY.search(key))


def url_has_secret(value: str) -> bool:
    """A URL with credentials in it: user info (`user:pass@host`), or a query parameter named like a key."""
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc:
        return False
    if "@" in parts.netloc:
        return True
    return any(SECRET_QUERY.search(name) and v for name, v in parse_qsl(parts.query, keep_blank_values=True))


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
    """`text` with every credential in it replaced by `***`: credential-shaped values, the user info of URLs and
    the values of key-like query parameters. What is left still names the thing (`http://***@host/v1`)."""
    text = SECRET_VALUE.sub(REDACTED, text)
    text = USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return QUERY_PARAM.sub(lambda m: f"{m['sep']}{m['name']}={REDACTED}" if SECRET_QUERY.search(m["name"])
                           and m["value"] else m[0], text)


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
