"""The sources registry (one small YAML file per source) and the readers that list a source's files.

A source is a local folder or an S3 "landing zone" prefix, in one of two layouts:

* ``folders``: one sub-folder per label; files at the top level (and hidden files) are ignored.
* ``csv``: a manifest file (``path,label[,patient_id]``) whose paths are relative to the location.

Readers never open a file outside the source's location: a manifest path such as ``../x.jpg`` (or a
symlink leading out of the folder) is listed with a ``path_error`` so ingest can reject it by name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import get_task
from pipelines.data.groups import GroupSpec, GroupSpecError

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.io.storage import ObjectStore

Layout = Literal["folders", "csv"]
Role = Literal["train", "holdout"]
LAYOUTS = ("folders", "csv")
ROLES = ("train", "holdout")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class SourceError(LeukopsError):
    """A source definition is missing or invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Source:
    name: str
    location: str  # absolute local folder, or s3://bucket/prefix
    layout: Layout
    label_map: dict[str, str]  # source label -> canonical class
    tasks: tuple[str, ...]
    role: Role = "train"
    csv: str = "manifest.csv"  # csv layout: the manifest's path relative to the location
    group_by: str | None = None  # patient | source | regex:<pattern>: a group's images share one split
    group_block: int | None = None  # regex form: the named group `key`'s number // group_block
    licence: str = ""
    notes: str = ""

    @property
    def label_map_version(self) -> str:
        """Changes whenever the label map changes, so a remapped source makes a new batch."""
        text = json.dumps(self.label_map, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def canonical_classes(self) -> tuple[str, ...]:
        """The classes of every task this source feeds, in task order."""
        return tuple(dict.fromkeys(c for t in self.tasks for c in get_task(t).classes))

    @property
    def grouping(self) -> GroupSpec:
        return GroupSpec(self.group_by, self.group_block)

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def to_yaml(self) -> str:
        data = asdict(self)
        data["tasks"] = list(self.tasks)
        if self.layout != "csv":
            data.pop("csv")
        if self.group_block is None:
            data.pop("group_block")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the source location, posix separators
    source_label: str
    patient_id: str | None = None
    path_error: str | None = None  # set when the file must not be read (e.g. path traversal)


def validate_source(source: Source, where: str) -> Source:
    """Check every field; return the source with ``tasks`` as a tuple."""
    if not NAME_PATTERN.match(source.name):
        raise SourceError(f"{where}: name {source.name!r} must match {NAME_PATTERN.pattern} (used in S3 keys)")
    if source.layout not in LAYOUTS:
        raise SourceError(f"{where}: layout {source.layout!r} is not one of {', '.join(LAYOUTS)}")
    if source.role not in ROLES:
        raise SourceError(f"{where}: role {source.role!r} is not one of {', '.join(ROLES)}")
    try:
        source.grouping  # noqa: B018 - builds (and so checks) the grouping
    except GroupSpecError as err:
        raise SourceError(f"{where}: {err}") from None
    if not source.tasks:
        raise SourceError(f"{where}: `tasks` is empty; name the task(s) this source feeds")
    classes = tuple(dict.fromkeys(c for t in source.tasks for c in _task_classes(t, where)))
    bad = {k: v for k, v in source.label_map.items() if v not in classes}
    if bad:
        raise SourceError(
            f"{where}: label map targets {sorted(set(bad.values()))} are not classes of {list(source.tasks)} "
            f"(known: {', '.join(classes)})"
        )
    return Source(**{**asdict(source), "tasks": tuple(source.tasks)})


def _task_classes(task: str, where: str) -> tuple[str, ...]:
    try:
        return get_task(task).classes
    except LeukopsError as err:
        raise SourceError(f"{where}: {err}") from None


def source_from_mapping(data: dict, where: str) -> Source:
    if not isinstance(data, dict):
        raise SourceError(f"{where}: expected a YAML mapping, got {type(data).__name__}")
    known = set(Source.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise SourceError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    missing = {"name", "location", "layout", "tasks"} - set(data)
    if missing:
        raise SourceError(f"{where}: missing field(s) {sorted(missing)}")
    tasks = data["tasks"]
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    label_map = {str(k): str(v) for k, v in (data.get("label_map") or {}).items()}
    fields = {**data, "tasks": tasks, "label_map": label_map, "location": str(data["location"])}
    fields["licence"], fields["notes"] = str(data.get("licence") or ""), str(data.get("notes") or "")
    return validate_source(Source(**fields), where)


def source_path(name: str, settings: Settings) -> Path:
    return Path(settings.sources_dir) / f"{name}.yaml"


def load_source(name: str, settings: Settings) -> Source:
    path = source_path(name, settings)
    if not path.is_file():
        known = ", ".join(s.name for s in list_sources(settings)) or "none"
        raise SourceError(f"no source {name!r}: {path} does not exist (registered: {known})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SourceError(f"{path}: not valid YAML: {err}") from None
    source = source_from_mapping(data, str(path))
    if source.name != name:
        raise SourceError(f"{path}: name {source.name!r} differs from the file name {name!r}")
    return source


def list_sources(settings: Settings) -> list[Source]:
    folder = Path(settings.sources_dir)
    if not folder.is_dir():
        return []
    return [load_source(p.stem, settings) for p in sorted(folder.glob("*.yaml"))]


def default_label_map(tasks: Iterable[str]) -> dict[str, str]:
    """Identity over the tasks' classes: folder / csv labels already use the canonical names."""
    return {c: c for t in tasks for c in get_task(t).classes}


def save_source(source: Source, settings: Settings, *, replace: bool = False) -> Path:
    """Write ``<sources_dir>/<name>.yaml`` atomically (temp file + rename)."""
    path = source_path(source.name, settings)
    source = validate_source(source, str(path))
    if path.exists() and not replace:
        raise SourceError(f"{path} already exists; pass --replace to overwrite it (git keeps the history)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(source.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- layouts: pure functions from a listing / a manifest text to SourceFile entries ----------------


def folder_entries(relative_paths: Iterable[str]) -> list[SourceFile]:
    """``<label>/<...>/<file>`` → one entry per file; top-level and hidden files are ignored."""
    entries = []
    for rel in sorted(relative_paths):
        parts = rel.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue
        entries.append(SourceFile(path=rel, source_label=parts[0]))
    return entries


def safe_relative(path: str) -> str | None:
    """The normalised relative path, or None when it is absolute or climbs out of the root."""
    cleaned = path.strip().replace("\\", "/")
    if not cleaned or cleaned.startswith("/") or re.match(r"^[A-Za-z]:", cleaned):
        return None
    normal = posixpath.normpath(cleaned)
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return normal


def csv_entries(text: str, where: str) -> list[SourceFile]:
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if not {"path", "label"} <= columns:
        raise SourceError(f"{where}: needs columns path,label[,patient_id]; found {sorted(columns)}")
    entries = []
    for row in reader:
        raw_path = (row.get("path") or "").strip()
        safe = safe_relative(raw_path)
        entries.append(
            SourceFile(
                path=safe or raw_path,
                source_label=(row.get("label") or "").strip(),
                patient_id=(row.get("patient_id") or "").strip() or None,
                path_error=None if safe else f"path {raw_path!r} is absolute or leaves the source folder",
            )
        )
    return entries


# -- readers: the only code that touches a source's files ------------------------------------------


class LocalReader:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SourceError(f"source folder {root} does not exist or is not a folder")

    def listing(self) -> list[str]:
        """Files and symlinks under the root; like ``rglob``, symlinked folders are listed, not entered."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            rel = os.path.relpath(folder, self.root).replace(os.sep, "/")
            prefix = "" if rel == "." else f"{rel}/"
            found += [prefix + name for name in files]
            found += [prefix + name for name in dirs if os.path.islink(os.path.join(folder, name))]
        return found

    def read_text(self, rel: str) -> str:
        path = self.root / rel
        if not path.is_file():
            raise SourceError(f"{path} does not exist")
        return path.read_text(encoding="utf-8-sig")

    def escapes(self, rel: str) -> bool:
        """True when the path (after following symlinks) lies outside the source folder."""
        real = os.path.realpath(os.path.join(self.root, rel))  # str paths: pathlib costs ~10x per file
        return not (real == str(self.root) or real.startswith(str(self.root) + os.sep))

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class S3Reader:
    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""

    def listing(self) -> list[str]:
        return [k[len(self.prefix) :] for k in self.store.iter_keys(self.prefix) if not k.endswith("/")]

    def read_text(self, rel: str) -> str:
        return self.store.get_bytes(self.prefix + rel).decode("utf-8-sig")

    def escapes(self, rel: str) -> bool:
        return False  # keys are plain names; traversal is caught by safe_relative

    def read(self, rel: str) -> bytes:
        return self.store.get_bytes(self.prefix + rel)


def reader_for(source: Source, settings: Settings) -> LocalReader | S3Reader:
    if source.is_s3:
        from pipelines.io.storage import ObjectStore

        bucket, _, prefix = source.location[len("s3://") :].partition("/")
        return S3Reader(ObjectStore.from_settings(settings, bucket=bucket), prefix)
    return LocalReader(Path(source.location))


def list_files(source: Source, reader: LocalReader | S3Reader) -> list[SourceFile]:
    if source.layout == "csv":
        entries = csv_entries(reader.read_text(source.csv), f"{source.location}/{source.csv}")
    else:
        entries = folder_entries(reader.listing())
    return [
        SourceFile(e.path, e.source_label, e.patient_id, "symlink leads outside the source folder")
        if e.path_error is None and reader.escapes(e.path)
        else e
        for e in entries
    ]
