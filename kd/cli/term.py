"""Output for people: colour only on a terminal, long reports through $PAGER only on a terminal, and data
(teacher answers, seed text, what a remote sent) made printable first: a control character in data is shown,
never sent, so an answer cannot clear the screen, retitle the window or write the clipboard (OSC 52)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from typing import Any

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


def say(*parts: Any, err: bool = False) -> None:
    """print(), for lines that carry data: each part made printable first."""
    print(*(printable(str(p)) for p in parts), file=sys.stderr if err else sys.stdout)


_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


class Style:
    """ANSI styles that collapse to plain text when colour is off (pipes, files, NO_COLOR)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __getattr__(self, name: str):  # style.bold("x"), style.red("y")
        code = _CODES.get(name)
        if code is None:
            raise AttributeError(name)
        return lambda text: f"\033[{code}m{text}\033[0m" if self.enabled else text

    def diff(self, text: str, indent: str = "    ") -> str:
        """A unified diff, indented, with removed lines red and added lines green."""
        out = []
        for line in text.splitlines():
            if line.startswith(("---", "+++")):
                line = self.bold(line)
            elif line.startswith("-"):
                line = self.red(line)
            elif line.startswith("+"):
                line = self.green(line)
            elif line.startswith("@@"):
                line = self.cyan(line)
            out.append(indent + line)
        return "\n".join(out)


def use_colour(mode: str) -> bool:
    if mode == "always":
        return True
    return mode == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ


def emit(text: str, pager: bool = True) -> None:
    """Print `text`; on a terminal, through $PAGER (default `less -FRX`, which exits if it fits)."""
    command = os.environ.get("PAGER", "less -FRX") if pager and sys.stdout.isatty() else ""
    if command.strip() and command.strip() != "cat":
        try:
            subprocess.run(shlex.split(command), input=text, text=True, check=False)
            return
        except (OSError, ValueError):
            pass  # no such pager: print instead
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `kd diff ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
