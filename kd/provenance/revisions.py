"""Files as they were at a git revision: DVC outputs through DVC's cache, templates through git.

`Snapshot(root, rev)` reads any path of the project at `rev` (None = the workspace): DVC-tracked outputs
come from the local DVC cache via `DVCFileSystem`, which needs no network (DESIGN.md §7). After `dvc gc`
DVC reports a missing object as "No storage files available"/"path does not exist"; that becomes a
KdError telling the user to fetch it. Template history answers "which commit had this sha256?" by hashing
every blob git ever stored at the path (one `git log --raw` and one `git cat-file --batch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KdError

WORKSPACE = "workspace"


def git(root: Path, *args: str, input: bytes | None = None) -> bytes:
    """Run git in `root`; a failure is a KdError quoting git's own message."""
    try:
        r = subprocess.run(["git", "-C", str(root), *args], input=input, capture_output=True, check=False)
    except FileNotFoundError:
        raise KdError("git is not installed; revisions need git") from None
    if r.returncode != 0:
        raise KdError(f"git {' '.join(args[:2])}: {r.stderr.decode(errors='replace').strip() or 'failed'}")
    return r.stdout


def resolve_rev(root: Path, rev: str) -> str:
    """The full commit id of `rev`, or a KdError naming the revision."""
    try:
        return git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    except KdError:
        raise KdError(f"{rev}: not a git revision of {root.resolve()}") from None


@dataclass
class Snapshot:
    """The project at one revision (rev None = the files on disk now)."""

    root: Path
    rev: str | None = None
    _fs: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.rev or WORKSPACE

    def _dvcfs(self) -> Any:
        if self._fs is None:
            from dvc.api import DVCFileSystem

            resolve_rev(self.root, self.rev)  # DVCFileSystem is lazy and would fail later with a vaguer error
            self._fs = DVCFileSystem(str(self.root), rev=self.rev)
        return self._fs

    def read(self, path: str, missing_ok: bool = False) -> bytes | None:
        """The bytes of `path` (relative to the root) at this revision; None if absent and `missing_ok`."""
        if self.rev is None:
            try:
                return (self.root / path).read_bytes()
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise KdError(f"{path}: not found in the workspace") from None
        fs = self._dvcfs()
        try:
            return fs.read_bytes(path)
        except FileNotFoundError:
            if fs.exists(path):  # dvc.lock names the file, but its object is not in the local cache
                raise self._not_cached(path) from None
            if missing_ok:  # in neither that commit's tree nor its dvc.lock
                return None
            raise KdError(f"{path}: does not exist at {self.rev}") from None
        except Exception as e:
            if type(e).__name__ != "DataIndexDirError":  # dvc_data: a directory's .dir object is gone
                raise
            raise self._not_cached(path) from None

    def _not_cached(self, path: str) -> KdError:
        # DVC's own messages ("path does not exist", "No storage files available") send people astray
        top = "/".join(path.split("/")[:2])
        return KdError(f"{path} at {self.rev}: DVC tracks it but its data is not in the local cache (removed by "
                       f"`dvc gc`, or never fetched); run `dvc fetch --all-commits {top}` or "
                       f"`git checkout {self.rev} && dvc pull`, then try again")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def path_history(root: Path, path: str) -> tuple[tuple[str, str, str], ...]:
    """(commit, blob sha256, blob id) for every commit that changed `path`, newest first.

    A deletion has an empty sha256. Not a git repository, or a path git never saw: ().
    """
    try:
        log = git(root, "log", "--format=C %H", "--raw", "--no-abbrev", "--no-renames", "--", path).decode()
    except KdError:
        return ()
    rows: list[tuple[str, str]] = []
    commit = ""
    for line in log.splitlines():
        if line.startswith("C "):
            commit = line[2:].strip()
        elif line.startswith(":") and commit:
            rows.append((commit, line.split()[3]))  # ":mode mode old new status\tpath": the new blob
    blobs = sorted({b for _, b in rows if set(b) != {"0"}})
    shas = _blob_sha256(root, blobs)
    return tuple((c, shas.get(b, ""), b) for c, b in rows)


def _blob_sha256(root: Path, blobs: list[str]) -> dict[str, str]:
    if not blobs:
        return {}
    out = git(root, "cat-file", "--batch", input="".join(f"{b}\n" for b in blobs).encode())
    shas, pos = {}, 0
    for b in blobs:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        shas[b] = sha256_bytes(out[header_end + 1: header_end + 1 + size])
        pos = header_end + 1 + size + 1
    return shas


def template_origin(root: Path, path: str, sha256: str) -> dict[str, Any]:
    """Where a template version lives in git.

    Returns `introduced` (the commit that gave the file this content), `commit` (the newest commit that
    still had it: HEAD if it is still current, else the parent of the commit that changed it), and
    `current` (whether today's file on disk has this sha256).
    """
    file = root / path
    current = file.is_file() and sha256_bytes(file.read_bytes()) == sha256
    history = path_history(root, path)
    for i, (commit, sha, _) in enumerate(history):
        if sha != sha256:
            continue
        if i == 0:
            last = resolve_rev(root, "HEAD")
        else:
            last = git(root, "rev-parse", f"{history[i - 1][0]}^").decode().strip()
        return {"introduced": commit, "commit": last, "current": current}
    return {"introduced": None, "commit": None, "current": current}


def text_with_sha(root: Path, path: str, sha256: str, revs: tuple[str | None, ...] = ()) -> str | None:
    """The text of `path` whose sha256 is `sha256`: from the workspace, a given revision, or git history."""
    candidates: list[bytes] = []
    file = root / path
    if file.is_file():
        candidates.append(file.read_bytes())
    for rev in revs:
        if rev:
            with contextlib.suppress(KdError):  # the file did not exist at that revision
                candidates.append(git(root, "show", f"{rev}:./{path}"))
    for data in candidates:
        if sha256_bytes(data) == sha256:
            return data.decode("utf-8", errors="replace")
    for _, sha, blob in path_history(root, path):
        if sha == sha256:
            return git(root, "cat-file", "blob", blob).decode("utf-8", errors="replace")
    return None
