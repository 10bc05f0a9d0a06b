"""GitOps: keep the store in step with the manifests under a path of a Git repository.

One sync: fetch the ref into a bare mirror kept in a cache directory (git CLI, no shell), read
every *.yaml / *.yml under the path at the fetched commit, validate all of them, then apply them
in dependency order. Nothing is written when any manifest of the commit is invalid: the objects
stay as the last good commit left them. Every sync applies again, even when the commit did not
change, so hand edits are reverted (drift correction).

The GitSync object named after the sync records the outcome and an inventory: the objects this
sync created. Only inventory objects that left Git are ever pruned (and only with `prune`);
objects that existed before the sync touched them are applied but never deleted. Without
`prune`, an object that leaves Git is released: it stays and leaves the inventory. A source with
no manifests is refused unless `allow_empty`, so a wrong path or an emptied folder cannot
delete everything.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import ValidationError

from controller.apply import CONCURRENCY, Applied, apply_one, find_clash, in_apply_order
from controller.manifests import MAX_FILE_BYTES, Manifest, ManifestError, load_text
from controller.runtime.events import EventRecorder
from controller.runtime.store import AlreadyExists, Conflict, NotFound, Store, StoreError
from crds import APPLY_ORDER, AnyResource, GitSync, ObjectMeta, describe_validation_error
from crds.event import ObjectReference
from crds.gitsync import GitSyncSpec, GitSyncStatus, InventoryEntry
from crds.meta import _check_name, now

log = logging.getLogger(__name__)

COMPONENT = "kvmctl-sync"
GIT_TIMEOUT = 300.0
MANIFEST_SUFFIXES = (".yaml", ".yml")
UNSYNCABLE_KINDS = ("Event", "GitSync")
MAX_TEXT = 4096  # the API's limit for condition and status messages
_INTERVAL = re.compile(r"^(\d+)([smh]?)$")
_INTERVAL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
_SCP_LIKE = re.compile(r"^[^/:]+:")  # `host:path`, which git reads as SSH

FailureReason = Literal[
    "FetchFailed", "InvalidManifest", "EmptySource", "ApplyFailed", "PruneFailed"
]


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


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _short(commit: str | None) -> str:
    return (commit or "-")[:12]


# Git -----------------------------------------------------------------------------------------


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
            raise GitError(f"path {path!r} at commit {_short(commit)} is a {kind}, not a folder")
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


# Applying ------------------------------------------------------------------------------------


async def apply_objects(
    store: Store, objects: Sequence[AnyResource]
) -> tuple[list[Applied], list[str]]:
    """Apply kind by kind in dependency order; what was applied, and one line per failure.

    Unlike `apply_all`, a failing object does not hide what the others did: the sync must know
    every object it created to keep its inventory right.
    """
    limit = asyncio.Semaphore(CONCURRENCY)
    applied: list[Applied] = []
    failures: list[str] = []

    async def bounded(obj: AnyResource, known: AnyResource | None) -> Applied:
        async with limit:
            return await apply_one(store, obj, known=known)

    for group in in_apply_order(objects):
        stored, _ = await store.list_objects(group[0].kind)
        by_name = {obj.metadata.name: obj for obj in stored}
        results = await asyncio.gather(
            *(bounded(obj, by_name.get(obj.metadata.name)) for obj in group),
            return_exceptions=True,
        )
        for obj, result in zip(group, results, strict=True):
            if isinstance(result, StoreError):
                failures.append(f"{obj.kind} {obj.metadata.name!r}: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                applied.append(result)
    return applied, failures


def _removal_order(entries: Sequence[InventoryEntry]) -> list[InventoryEntry]:
    """Dependents first: the reverse of the apply order."""
    rank = {kind: index for index, kind in enumerate(APPLY_ORDER)}
    return sorted(entries, key=lambda e: (-rank.get(e.kind, len(rank)), e.name))


def _label(kind: str, name: str) -> str:
    return f"{kind.lower()}/{name}"


# Syncing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncOptions:
    repo: str
    name: str
    ref: str = "main"
    path: str = "."
    interval_seconds: int = 30
    prune: bool = False
    allow_empty: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)
    git_timeout: float = GIT_TIMEOUT


@dataclass
class SyncResult:
    """What one sync did. `reason` is the Ready condition's reason."""

    ok: bool
    reason: str
    message: str
    commit: str | None = None
    applied: list[Applied] = field(default_factory=list)
    pruned: list[InventoryEntry] = field(default_factory=list)
    released: list[InventoryEntry] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)
    """Objects a hand edit had changed since the commit was last applied."""
    failed: int = 0

    def count(self, outcome: str) -> int:
        return sum(1 for item in self.applied if item.outcome == outcome)

    @property
    def changed(self) -> bool:
        return self.count("unchanged") < len(self.applied) or bool(self.pruned or self.released)


class GitSyncer:
    """Syncs one path of one repository into the store; see the module docstring."""

    def __init__(
        self, store: Store, options: SyncOptions, recorder: EventRecorder | None = None
    ) -> None:
        _check_name(options.name)
        self.store = store
        self.options = options
        self.path = normalize_path(options.path)
        try:
            self.spec = GitSyncSpec(
                repo=options.repo,
                ref=options.ref,
                path=self.path,
                interval_seconds=options.interval_seconds,
                prune=options.prune,
            )
        except ValidationError as error:
            raise ValueError(f"sync {options.name}: {describe_validation_error(error)}") from None
        self.mirror = GitMirror(options.repo, options.cache_dir, options.git_timeout)
        self.recorder = recorder or EventRecorder(store, COMPONENT)

    async def state(self) -> GitSync:
        """The GitSync object, created if missing, its spec made to match the options."""
        name = self.options.name
        for _ in range(10):
            existing = await self.store.try_get("GitSync", name)
            if existing is None:
                try:
                    return await self.store.create(
                        GitSync(metadata=ObjectMeta(name=name), spec=self.spec)
                    )
                except AlreadyExists:
                    continue
            assert isinstance(existing, GitSync)
            if existing.spec == self.spec:
                return existing
            existing.spec = self.spec.model_copy()
            try:
                return await self.store.update(existing)
            except Conflict:
                continue
        raise Conflict(f"GitSync {name!r} kept changing; try again")

    async def sync(self) -> SyncResult:
        """Fetch, validate, apply, prune, record. Raises only StoreError (etcd trouble)."""
        state = await self.state()
        try:
            commit = await self.mirror.fetch(self.options.ref)
        except GitError as error:
            return await self._failed(state, "FetchFailed", str(error), None, 1)
        try:
            files = await self.mirror.manifest_files(commit, self.path)
            too_large = [f for f in files or [] if f.size > MAX_FILE_BYTES]
            if too_large:
                problems = [
                    f"{f.path}: file is {f.size} bytes, larger than the {MAX_FILE_BYTES} limit"
                    for f in too_large
                ]
                return await self._invalid(state, commit, problems)
            contents = await self.mirror.read_blobs([f.object_id for f in files or []])
        except GitError as error:
            return await self._failed(state, "FetchFailed", str(error), commit, 1)
        loaded, problems = parse_files(files or [], contents)
        if problems:
            return await self._invalid(state, commit, problems)
        if not loaded and not self.options.allow_empty:
            where = "does not exist" if files is None else "holds no manifests"
            message = (
                f"path {self.path!r} {where} at commit {_short(commit)}: refusing to sync an "
                "empty source (it would release or prune every object); use --allow-empty"
            )
            return await self._failed(state, "EmptySource", message, commit, 1)
        return await self._apply(state, commit, [item.object for item in loaded])

    async def _invalid(self, state: GitSync, commit: str, problems: list[str]) -> SyncResult:
        message = f"commit {_short(commit)} refused, nothing applied: " + "; ".join(problems)
        return await self._failed(state, "InvalidManifest", message, commit, len(problems))

    async def _apply(self, state: GitSync, commit: str, desired: list[AnyResource]) -> SyncResult:
        in_git = {(obj.kind, obj.metadata.name) for obj in desired}
        vms_to_prune = [
            e.name
            for e in state.status.inventory
            if self.options.prune and e.kind == "VirtualMachine" and (e.kind, e.name) not in in_git
        ]
        clash = await find_clash(self.store, desired, leaving=vms_to_prune)
        if clash is not None:
            return await self._invalid(state, commit, [clash])
        applied, failures = await apply_objects(self.store, desired)
        created = [
            InventoryEntry(kind=a.object.kind, name=a.object.metadata.name)
            for a in applied
            if a.outcome == "created"
        ]
        previous = state.status.inventory
        kept = [e for e in previous if (e.kind, e.name) in in_git]
        gone = _removal_order([e for e in previous if (e.kind, e.name) not in in_git])
        result = SyncResult(ok=True, reason="Synced", message="", commit=commit, applied=applied)
        if commit == state.status.last_synced_commit:
            result.drifted = [
                _label(a.object.kind, a.object.metadata.name)
                for a in applied
                if a.outcome != "unchanged"
            ]
        left: list[InventoryEntry] = []
        if failures:
            left = gone  # prune nothing while the desired state is not fully written
            result.ok, result.reason, result.failed = False, "ApplyFailed", len(failures)
            result.message = f"commit {_short(commit)}: could not apply " + "; ".join(failures)
        elif self.options.prune:
            left = await self._prune(gone, commit, result)
        else:
            result.released = gone
        inventory = _unique([*kept, *created, *left])
        if result.ok:
            result.message = (
                f"commit {_short(commit)}: {result.count('created')} created, "
                f"{result.count('configured')} configured, {result.count('unchanged')} unchanged, "
                f"{len(result.pruned)} pruned"
            )
        await self._write_status(state, result, inventory)
        await self._record_events(state, result)
        return result

    async def _prune(
        self, entries: list[InventoryEntry], commit: str, result: SyncResult
    ) -> list[InventoryEntry]:
        """Delete inventory objects that left Git; the entries that could not be deleted."""
        left: list[InventoryEntry] = []
        failures: list[str] = []
        for entry in entries:
            try:
                deleted = await self.store.delete(entry.kind, entry.name)
            except NotFound:
                continue  # deleted by someone else already
            except StoreError as error:
                failures.append(f"{entry.kind} {entry.name!r}: {error}")
                left.append(entry)
                continue
            result.pruned.append(entry)
            uid = deleted.metadata.uid if deleted is not None else None
            await self.recorder.record(
                ObjectReference(kind=entry.kind, name=entry.name, uid=uid),
                "Normal",
                "Pruned",
                "deleted by gitsync %s: no longer in Git at commit %s",
                self.options.name,
                _short(commit),
            )
        if failures:
            result.ok, result.reason, result.failed = False, "PruneFailed", len(failures)
            result.message = f"commit {_short(commit)}: could not prune " + "; ".join(failures)
        return left

    async def _failed(
        self, state: GitSync, reason: FailureReason, message: str, commit: str | None, failed: int
    ) -> SyncResult:
        """Record a sync that wrote nothing: the inventory and last synced commit stay."""
        result = SyncResult(ok=False, reason=reason, message=message, commit=commit, failed=failed)
        await self._write_status(state, result, state.status.inventory)
        await self._record_events(state, result)
        return result

    async def _write_status(
        self, state: GitSync, result: SyncResult, inventory: list[InventoryEntry]
    ) -> None:
        def mutate(current: Any) -> None:
            status: GitSyncStatus = current.status
            status.last_attempted_commit = result.commit or status.last_attempted_commit
            if result.ok:
                status.last_synced_commit = result.commit
                status.last_sync_time = now()
                status.applied = len(result.applied)
                status.pruned = len(result.pruned)
            status.failed = result.failed
            status.inventory = inventory
            status.message = _clip(result.message)
            status.set_condition(
                "Ready",
                "True" if result.ok else "False",
                result.reason,
                _clip(result.message),
                current.metadata.generation,
            )

        await self.store.patch_status("GitSync", state.metadata.name, mutate)

    async def _record_events(self, state: GitSync, result: SyncResult) -> None:
        record = self.recorder.record
        if result.drifted:
            await record(
                state,
                "Normal",
                "DriftCorrected",
                "restored %s to commit %s",
                ", ".join(result.drifted),
                _short(result.commit),
            )
        if result.pruned:
            names = ", ".join(_label(e.kind, e.name) for e in result.pruned)
            await record(state, "Normal", "Pruned", "deleted what left Git: %s", names)
        if result.released:
            names = ", ".join(_label(e.kind, e.name) for e in result.released)
            await record(
                state, "Normal", "Released", "left Git, kept because prune is off: %s", names
            )
        if result.ok:
            await record(state, "Normal", "SyncSucceeded", "%s", result.message)
        else:
            await record(state, "Warning", "SyncFailed", "%s: %s", result.reason, result.message)

    async def run(
        self, stop: asyncio.Event, report: Callable[[SyncResult], None] | None = None
    ) -> None:
        """Sync every interval until `stop` is set; a sync in progress finishes first."""
        while not stop.is_set():
            try:
                result = await self.sync()
            except StoreError as error:
                log.warning("sync %s: %s", self.options.name, error)
                result = SyncResult(ok=False, reason="StoreError", message=str(error))
            if report is not None:
                report(result)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.interval_seconds)


def _unique(entries: list[InventoryEntry]) -> list[InventoryEntry]:
    seen: dict[tuple[str, str], InventoryEntry] = {}
    for entry in entries:
        seen.setdefault((entry.kind, entry.name), entry)
    return sorted(seen.values(), key=lambda e: (e.kind, e.name))
