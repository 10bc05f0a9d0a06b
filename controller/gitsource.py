"""A GitOps source: a bare mirror of the repository (git CLI, no shell) and the manifests of one
commit under a path, parsed and checked; the sync (controller/gitsync.py) applies them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from controller.manifests import Manifest, ManifestError, load_text

GIT_TIMEOUT = 300.0
MANIFEST_SUFFIXES = (".yaml", ".yml")
UNSYNCABLE_KINDS = ("Event", "GitSync")
_INTERVAL = re.compile(r"^(\d+)([smh]?)$")
_INTERVAL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
_SCP_LIKE = re.compile(r"^[^/:]+:")  # `host:path`, which git reads as SSH


class GitError(Exception):
    """A git command failed; the message says which and why."""


def parse_interval(text: str) -> int:
    """Seconds in `30s`, `5m`, `1h` or plain `45`; at least 1."""
    match = _INTERVAL.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(
            f"interval {text!r} must be a positive number of seconds, or like 30s, 5m, 1h"
        )
    return int(match.group(1)) * _INTERVAL_UNITS[match.group(2)]


def normalize_repo(repo: str) -> str:
    """The repository as git is given it: an existing local folder becomes an absolute path."""
    if "://" in repo or _SCP_LIKE.match(repo) or not Path(repo).exists():
        return repo
    return str(Path(repo).resolve())


def normalize_path(path: str) -> str:
    """A folder inside the repository, relative to its root without `./` (`.` is the root)."""
    parts = [part for part in PurePosixPath(path.strip()).parts if part not in ("/", ".")]
    if ".." in parts:
        raise ValueError(f"path {path!r} must stay inside the repository (no '..')")
    return "/".join(parts) or "."


def default_name(repo: str, path: str) -> str:
    """A DNS-1123 name for the sync of `path` in `repo`: readable words and a short hash."""
    digest = hashlib.sha256(f"{repo}\x00{path}".encode()).hexdigest()[:8]
    words = [PurePosixPath(repo.rstrip("/")).name.removesuffix(".git")]
    if path != ".":
        words.append(path)
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(words).lower()).strip("-")
    slug = slug[: 63 - len(digest) - 1].rstrip("-")
    return f"{slug}-{digest}" if slug else f"gitsync-{digest}"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kvmctl" / "git"


def short(commit: str | None) -> str:
    return (commit or "-")[:12]


@dataclass(frozen=True)
class TreeFile:
    path: str
    """The file's path from the repository's root."""
    object_id: str
    size: int


class GitMirror:
    """A bare mirror of one repository in `cache_root/<hash of the URL>`, filled by `git fetch`."""

    def __init__(self, repo: str, cache_root: Path, timeout: float = GIT_TIMEOUT) -> None:
        self.repo = repo
        self.directory = cache_root / hashlib.sha256(repo.encode()).hexdigest()[:16]
        self.timeout = timeout

    async def _run(self, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run git on the mirror; (exit code, stdout, stderr). Killed after the timeout."""
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
        command = ["git", "-c", "protocol.ext.allow=never", f"--git-dir={self.directory}", *args]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except FileNotFoundError:
            raise GitError("git is not installed (no 'git' on PATH)") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as error:
            process.kill()
            await process.wait()
            if isinstance(error, TimeoutError):
                raise GitError(f"git {args[0]} timed out after {self.timeout:.0f}s") from None
            raise
        return process.returncode or 0, out, err

    async def _git(self, *args: str, stdin: bytes | None = None) -> bytes:
        code, out, err = await self._run(*args, stdin=stdin)
        if code != 0:
            lines = [line.strip() for line in err.decode(errors="replace").splitlines()]
            detail = "; ".join(line for line in lines if line)[:2000]  # all of it, on one line
            raise GitError(f"git {args[0]} failed: {detail or f'exit {code}'}")
        return out

    async def fetch(self, ref: str) -> str:
        """Fetch `ref` (a branch or tag) from the repository; its commit id."""
        if not (self.directory / "HEAD").exists():
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            await self._git("init", "--quiet", "--bare")
        local = f"refs/kvmctl/{hashlib.sha256(ref.encode()).hexdigest()[:16]}"
        try:
            await self._git(
                "fetch",
                "--quiet",
                "--no-tags",
                "--force",
                "--no-write-fetch-head",
                "--",
                self.repo,
                f"+{ref}:{local}",
            )
        except GitError as error:
            raise GitError(f"fetching {ref!r} from {self.repo}: {error}") from None
        return (await self._git("rev-parse", "--verify", f"{local}^{{commit}}")).decode().strip()

    async def manifest_files(self, commit: str, path: str) -> list[TreeFile] | None:
        """The *.yaml / *.yml files under `path` at `commit`, sorted; None if `path` is missing."""
        spec = f"{commit}^{{tree}}" if path == "." else f"{commit}:{path}"
        code, out, _ = await self._run("cat-file", "-t", spec)
        kind = out.decode().strip()
        if code != 0:
            return None
        if kind != "tree":
            raise GitError(f"path {path!r} at commit {short(commit)} is a {kind}, not a folder")
        listing = await self._git("ls-tree", "-r", "-z", "-l", spec)
        prefix = "" if path == "." else f"{path}/"
        files = []
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, name_bytes = entry.partition(b"\t")
            mode, kind, object_id, size = meta.decode().split()
            name = name_bytes.decode(errors="replace")
            # Regular files only: symbolic links could point outside the path.
            if kind == "blob" and mode in ("100644", "100755") and name.endswith(MANIFEST_SUFFIXES):
                files.append(TreeFile(prefix + name, object_id, int(size)))
        return sorted(files, key=lambda f: f.path)

    async def read_blobs(self, object_ids: Sequence[str]) -> list[bytes]:
        """The contents of blobs, in order, read by one `git cat-file --batch`."""
        if not object_ids:
            return []
        out = await self._git(
            "cat-file", "--batch", stdin="".join(f"{i}\n" for i in object_ids).encode()
        )
        contents = []
        position = 0
        for object_id in object_ids:
            header_end = out.index(b"\n", position)
            header = out[position:header_end].decode().split()
            if len(header) != 3 or header[1] != "blob":
                raise GitError(f"git cat-file could not read object {object_id}")
            start = header_end + 1
            end = start + int(header[2])
            contents.append(out[start:end])
            position = end + 1  # a newline follows every object
        return contents


# Reading a commit ----------------------------------------------------------------------------


def parse_files(
    files: Sequence[TreeFile], contents: Sequence[bytes]
) -> tuple[list[Manifest], list[str]]:
    """Every object of every file, and one problem line per file that is not valid."""
    loaded: list[Manifest] = []
    problems: list[str] = []
    for file, data in zip(files, contents, strict=True):
        try:
            loaded.extend(load_text(_decode(data, file.path), file.path))
        except ManifestError as error:
            problems.append(str(error))
    seen: dict[tuple[str, str], str] = {}
    for item in loaded:
        kind, name = item.object.kind, item.object.metadata.name
        if kind in UNSYNCABLE_KINDS:
            problems.append(f"{item.where}: kind: {kind} objects cannot be synced from Git")
        elif (kind, name) in seen:
            problems.append(f"{item.where}: {kind} {name!r} is also defined in {seen[kind, name]}")
        else:
            seen[kind, name] = item.where
    return loaded, problems


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{source}: not UTF-8 (byte {error.start})") from None
