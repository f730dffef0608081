"""What looks like a secret: one definition for params validation, MLflow params and error messages.

Keys belong in environment variables (`api_key_env` names the variable); nothing kd writes may hold one.
"""

from __future__ import annotations

import re

# The last part of a key: `api_key`, `secret`, `password`, `token` or `*_token` (but not `max_tokens`).
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|(^|[_-])token)$", re.IGNORECASE)
# Values shaped like well-known credentials: OpenAI/Anthropic-style `sk-…`, Hugging Face `hf_…`, a bearer token.
SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|Bearer\s+\S{16,})")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """A params or MLflow key whose value would be a credential."""
    return bool(SECRET_KEY.search(key))


def looks_secret(value: str) -> bool:
    """A value shaped like a credential, wherever it appears."""
    return bool(SECRET_VALUE.search(value))
