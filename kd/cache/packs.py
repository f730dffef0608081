"""The pack: how requests travel to and from a remote (kd.cache.share) — entries' bytes one a line, sorted by key,
gzip'd without a timestamp (the same entries give the same bytes and name), and read back a line at a time under
limits, since a remote is not trusted: a pack that decompresses past PACK_MAX_BYTES, past PACK_MAX_RATIO times its
compressed size, or holds an entry over ENTRY_MAX_BYTES is a gzip bomb, not kd's, and is refused whole.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from typing import Any

PACK_ENTRIES = 50_000  # entries per pack: bounds the memory one pack takes to build
# Limits on a pack pulled from a remote. kd's own packs measure 1.2 KB an entry and 4.6x gzip (the default build's
# 136 entries: 164 KB in 35 KB), so a full pack is ~60 MB in ~13 MB: the limits leave 16x room for long answers.
PACK_MAX_BYTES = 1 << 30  # decompressed bytes of one pack
PACK_MAX_RATIO = 200  # decompressed / compressed bytes, judged once a pack is past RATIO_FROM
RATIO_FROM = 16 << 20  # below this a pack is small whatever its ratio (a few repetitive answers compress far better)
ENTRY_MAX_BYTES = 16 << 20  # one entry (one line of a pack): room for an answer of millions of characters


class PackRefused(Exception):
    """A remote pack past the limits on size or compression ratio: refused whole, in one line."""


def pack_lines(fs: Any, path: str) -> Iterator[bytes]:
    """The entries (lines) of a remote pack, decompressed as they are read; raises PackRefused past the limits,
    and what gzip or the filesystem raise for a damaged or unreadable pack. A last line without its newline is
    not an entry (a pack cut short)."""
    with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
        total = 0
        while line := f.readline(ENTRY_MAX_BYTES + 2):
            total += len(line)
            if len(line) > ENTRY_MAX_BYTES + 1:
                raise PackRefused(f"holds an entry over {ENTRY_MAX_BYTES >> 20} MB")
            if total > PACK_MAX_BYTES:
                raise PackRefused(f"decompresses past {PACK_MAX_BYTES >> 20} MB (the limit for one pack)")
            if total > RATIO_FROM and total > PACK_MAX_RATIO * max(raw.tell(), 1):
                raise PackRefused(f"decompresses past {PACK_MAX_RATIO}x its size (kd's packs: about 5x)")
            if line.endswith(b"\n"):
                yield line[:-1]


def pack(entries: list[tuple[str, bytes]]) -> tuple[str, bytes, bytes]:
    """(name, pack bytes, key list bytes) of entries: deterministic bytes, named by their sha256."""
    entries = sorted(entries)
    body = gzip.compress(b"".join(raw + b"\n" for _, raw in entries), compresslevel=1, mtime=0)
    return hashlib.sha256(body).hexdigest(), body, "".join(f"{key}\n" for key, _ in entries).encode("ascii")
