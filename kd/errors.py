"""User-facing errors: one clear line naming the culprit, never a bare traceback; and how text from data (seed rows,
teacher answers, what a remote sent) is made safe to print (`printable`, `one_line`): one home for both, since
an error message often quotes that text."""

from __future__ import annotations

import re
from typing import Any


class KdError(Exception):
    """A mistake the user can fix (bad params, unreadable seed, unsafe template, ...).

    The message must name the params key, file or record at fault; stages and the CLI print it as one
    line and exit with status 2.
    """


class TeacherError(KdError):
    """The teacher could not answer a request after all allowed attempts."""


# What a terminal acts on rather than shows: C0 controls but newline and tab (layout), DEL, C1 controls (U+0080–9F:
# \x9b is a one-byte CSI to some terminals), bidi controls that reorder what is shown ("Trojan Source": U+061C,
# U+200E/F, U+202A–E, U+2066–9), and lone surrogates (not UTF-8: printing one is a UnicodeEncodeError traceback).
UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def printable(value: Any, as_json: bool = False) -> Any:
    """`value` with every control character in its text shown as an escape (ESC -> `\\x1b`, U+202E -> `\\u202e`):
    a string, or the strings (keys too) of a report's dicts, lists and tuples. The one door data takes to a
    terminal: kd's own colour codes are added after it, by Style. `as_json`: `value` is JSON text, and each such
    character becomes the JSON escape `\\u00XX` (the document still parses to the same data)."""
    if isinstance(value, str):
        return UNPRINTABLE.sub(_json_escape if as_json else _shown, value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(printable(v) for v in value)
    return value


def one_line(text: str) -> str:
    """`text` as one printable line: every character that is not printable (newlines, tabs and the controls
    `printable` escapes) shown as its escape, so a message that quotes a value the user typed stays one line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
