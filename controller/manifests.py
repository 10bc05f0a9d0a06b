"""Read manifests: YAML files, folders or stdin, validated before anything is written.

Refused up front: files over the size limit, non-UTF-8 bytes, YAML aliases (the "billion laughs"
expansion) and merge keys, very deep nesting, a key given twice in one mapping (YAML would keep
the last silently), and any document that is not a valid object. Errors name the file,
the document's index and the field path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crds import AnyResource, parse_object

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_DOCUMENTS = 20000


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Manifest:
    source: str
    index: int
    object: AnyResource

    @property
    def where(self) -> str:
        return f"{self.source}, document {self.index}"


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 10x faster
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """The safe loader, refusing merge keys and a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            line = _line(key_node)
            if key_node.tag == _MERGE_TAG:
                raise ManifestError(f"line {line}: YAML merge keys ('<<') are not allowed")
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                raise ManifestError(f"line {line}: a mapping key must be a scalar") from None
            if first is not None:
                raise ManifestError(
                    f"line {line}: duplicate key {_shown(key)} (first on line {first})"
                )
            seen[key] = line
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


class _InDocument(ManifestError):
    """A problem found while building a document: its message starts `document N: `."""


def _documents(text: str) -> list[Any]:
    loader = _Loader(text)
    documents: list[Any] = []
    try:
        while loader.check_data():
            try:
                documents.append(loader.get_data())
            except ManifestError as error:
                index = sum(document is not None for document in documents)
                raise _InDocument(f"document {index}: {error}") from None
    finally:
        loader.dispose()
    return documents


def _shown(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _line(item: yaml.Event | yaml.Node) -> int:
    return item.start_mark.line + 1 if item.start_mark is not None else 0


def _check_structure(text: str) -> None:
    """Refuse aliases and deep nesting by scanning parser events, before building anything."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise ManifestError(f"line {_line(event)}: YAML aliases are not allowed")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError(f"line {_line(event)}: nesting deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str, source: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML text."""
    try:
        _check_structure(text)
        documents = _documents(text)
    except ManifestError as error:
        separator = ", " if isinstance(error, _InDocument) else ": "
        raise ManifestError(f"{source}{separator}{error}") from None
    except yaml.reader.ReaderError as error:  # its str() spans several lines
        raise ManifestError(
            f"{source}: character {error.position}: invalid YAML: {error.reason}"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(f"{source}: {line}invalid YAML: {problem}") from None
    found = [document for document in documents if document is not None]
    if len(found) > MAX_DOCUMENTS:
        raise ManifestError(f"{source}: more than {MAX_DOCUMENTS} documents")
    for index, document in enumerate(found):
        if not isinstance(document, dict):
            raise ManifestError(f"{source}, document {index}: expected a mapping")
    return found


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ManifestError(f"{path}: {error.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise ManifestError(f"{path}: file is {size} bytes, larger than the {MAX_FILE_BYTES} limit")
    return path.read_bytes()


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(f"{source}: input larger than the {MAX_FILE_BYTES} byte limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{source}: not UTF-8 (byte {error.start})") from None


def _files(target: str, recursive: bool) -> list[Path]:
    path = Path(target)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        return sorted(
            p for p in path.glob(pattern) if p.is_file() and p.suffix in (".yaml", ".yml", ".json")
        )
    if not path.exists():
        raise ManifestError(f"{target}: no such file or directory")
    return [path]


def load(targets: list[str], recursive: bool = False) -> list[Manifest]:
    """Every object in the given files, folders or `-` (stdin), all validated."""
    manifests: list[Manifest] = []
    for target in targets:
        if target == "-":
            sources = [("<stdin>", sys.stdin.buffer.read(MAX_FILE_BYTES + 1))]
        else:
            sources = [(str(path), _read_bytes(path)) for path in _files(target, recursive)]
        for source, data in sources:
            manifests.extend(load_text(_decode(data, source), source))
    seen: dict[tuple[str, str], str] = {}
    for manifest in manifests:
        key = (manifest.object.kind, manifest.object.metadata.name)
        if key in seen:
            raise ManifestError(
                f"{manifest.where}: {key[0]} {key[1]!r} is also defined in {seen[key]}"
            )
        seen[key] = manifest.where
    return manifests


def load_text(text: str, source: str) -> list[Manifest]:
    manifests = []
    for index, document in enumerate(parse_yaml(text, source)):
        try:
            obj = parse_object(document)
        except ValueError as error:
            raise ManifestError(f"{source}, document {index}: {error}") from None
        manifests.append(Manifest(source, index, obj))
    return manifests
