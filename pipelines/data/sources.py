"""The sources registry (one small YAML file per source) and the readers that list a source's files.

A source is a local folder or an S3 "landing zone" prefix, in one of two layouts:

* ``folders``: one sub-folder per label; files at the top level and hidden files are not read.
* ``csv``: a manifest file (``path,label[,patient_id]``) whose paths are relative to the location.

Every file a source holds becomes one entry, so a batch counts what it did not take. Readers never
open a file outside the source's location: a manifest path such as ``../x.jpg`` (or a symlink leading
out of the folder) is listed with a ``path_error``; a file the listing already refuses (hidden,
top-level, a name that is not UTF-8, a folder that cannot be listed) with ``not_read``. A local read
opens only regular files no larger than ``max_file_bytes``, both checked by ``stat`` before opening; an
S3 read checks the object's size with a HEAD before its GET.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import get_task
from pipelines.data.groups import SPLITS, GroupSpec, GroupSpecError

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.io.storage import ObjectStore

Layout = Literal["folders", "csv"]
Role = Literal["train", "holdout"]
LAYOUTS = ("folders", "csv")
ROLES = ("train", "holdout")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024  # no smear image is near it; a larger file is read nowhere
NOT_UTF8 = "file name is not valid UTF-8 (shown escaped)"
FILE_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "folder",
}


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
    split_shares: dict[str, float] | None = None  # {train, val, test}; None = 80/10/10 (data/groups.py)
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
        shares = self.split_shares
        if shares is not None and (not isinstance(shares, dict) or set(shares) != set(SPLITS)):
            raise GroupSpecError(f"split_shares {shares!r} must map each of {', '.join(SPLITS)} to a share")
        try:
            split = tuple(float(shares[s]) for s in SPLITS) if shares is not None else None
        except (TypeError, ValueError):
            raise GroupSpecError(
                f"split_shares {shares!r} must be numbers, e.g. {{train: 0.5, val: 0.1, test: 0.4}}"
            ) from None
        return GroupSpec(self.group_by, self.group_block, split)

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
        if self.split_shares is None:
            data.pop("split_shares")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the source location, posix separators
    source_label: str
    patient_id: str | None = None
    path_error: str | None = None  # set when the file must not be read (e.g. path traversal)
    not_read: str | None = None  # why the listing already refuses it (hidden, top-level, name not UTF-8)

    @property
    def readable(self) -> bool:
        return self.path_error is None and self.not_read is None


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


def escaped(text: str) -> str | None:
    """A name the file system gave as undecodable bytes (surrogate escapes), with those bytes shown as
    ``\\xff``; None when it is valid UTF-8. Manifests (parquet) can only store the escaped form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return None


def folder_entry(rel: str) -> SourceFile:
    """The entry of one listed path: ``<label>/<...>/<file>``, a hidden file or folder (a folder is
    listed with a trailing ``/``), a top-level file, or a name that is not UTF-8."""
    parts = rel.rstrip("/").split("/")
    label = parts[0] if len(parts) > 1 else ""
    if escaped(rel) is not None:
        return SourceFile(escaped(rel.rstrip("/")), escaped(label) or label, not_read=NOT_UTF8)
    hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
    if hidden is not None:
        is_folder = hidden < len(parts) - 1 or rel.endswith("/")
        what = (
            "hidden folder (name starts with '.'): not entered"
            if is_folder
            else "hidden file (name starts with '.'): not read"
        )
        return SourceFile("/".join(parts[: hidden + 1]), label, not_read=what)
    if len(parts) < 2:
        return SourceFile(rel, "", not_read="top-level file: the folders layout reads <label>/<file> only")
    return SourceFile(path=rel, source_label=label)


def folder_entries(relative_paths: Iterable[str]) -> list[SourceFile]:
    """One entry per listed file; the files of a hidden folder (an S3 prefix lists them all) share one."""
    entries: dict[str, SourceFile] = {}
    for rel in sorted(relative_paths):
        entry = folder_entry(rel)
        entries.setdefault(entry.path, entry)
    return list(entries.values())


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
        label, patient = (row.get("label") or "").strip(), (row.get("patient_id") or "").strip() or None
        if "\0" in raw_path:  # no file system accepts it (os.stat raises): shown escaped, never looked up
            shown = raw_path.replace("\0", "\\x00")
            entries.append(SourceFile(shown, label, patient, not_read="path contains a NUL byte (shown escaped)"))
            continue
        safe = safe_relative(raw_path)
        entries.append(
            SourceFile(
                path=safe or raw_path,
                source_label=label,
                patient_id=patient,
                path_error=None if safe else f"path {raw_path!r} is absolute or leaves the source folder",
            )
        )
    return entries


def decoded_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(f"{where} is not valid UTF-8 (byte {err.start}): save the manifest as UTF-8") from None


# -- readers: the only code that touches a source's files ------------------------------------------


class LocalReader:
    def __init__(self, root: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.root = root.resolve()
        self.max_file_bytes = max_file_bytes
        if not self.root.is_dir():
            raise SourceError(f"source folder {root} does not exist or is not a folder")

    def listing(self) -> tuple[list[str], dict[str, str]]:
        """(files and symlinks under the root, folder → why it could not be listed). Like ``rglob``,
        symlinked folders are listed, not entered; hidden folders are listed with a trailing ``/``, not
        entered (a ``.git`` is one row, not thousands)."""
        found: list[str] = []
        unlisted: dict[str, str] = {}

        def failed(err: OSError) -> None:
            rel = os.path.relpath(err.filename, self.root).replace(os.sep, "/")
            if rel == ".":
                raise SourceError(f"source folder {self.root} cannot be listed: {err}") from err
            unlisted[rel] = f"folder could not be listed: {err}"

        for folder, dirs, files in os.walk(self.root, onerror=failed):
            rel = os.path.relpath(folder, self.root).replace(os.sep, "/")
            prefix = "" if rel == "." else f"{rel}/"
            found += [prefix + name for name in files]
            for name in dirs:
                if os.path.islink(os.path.join(folder, name)):
                    found.append(prefix + name)
                elif name.startswith("."):
                    found.append(f"{prefix}{name}/")
            dirs[:] = [name for name in dirs if not name.startswith(".")]
        return found, unlisted

    def read_text(self, rel: str) -> str:
        path = self.root / rel
        if not path.is_file():
            raise SourceError(f"{path} does not exist")
        return decoded_text(path.read_bytes(), str(path))

    def escapes(self, rel: str) -> bool:
        """True when the path (after following symlinks) lies outside the source folder."""
        real = os.path.realpath(os.path.join(self.root, rel))  # str paths: pathlib costs ~10x per file
        return not (real == str(self.root) or real.startswith(str(self.root) + os.sep))

    def read(self, rel: str) -> bytes:
        """The file's bytes. Refused (SourceError) from its ``stat``, before it is opened, when it is not a
        regular file (a FIFO or device would block or have side effects) or is larger than max_file_bytes."""
        path = os.path.join(self.root, rel)
        info = os.stat(path)  # follows a symlink (list_files refused those leading out); opens nothing
        refuse_special(info)
        refuse_oversized(info.st_size, self.max_file_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO swapped in since cannot block
        with os.fdopen(fd, "rb") as file:
            refuse_special(os.fstat(fd))
            data = file.read(info.st_size + 1)  # bounded by the checked size; one byte more shows growth
        if len(data) > info.st_size:
            raise SourceError(f"changed while it was being read (grew past its {info.st_size} bytes)")
        return data


def refuse_special(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "special file")
        raise SourceError(f"not a regular file ({kind}): special files are never opened")


class S3Reader:
    def __init__(self, store: ObjectStore, prefix: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.max_file_bytes = max_file_bytes

    def listing(self) -> tuple[list[str], dict[str, str]]:
        keys = [k[len(self.prefix) :] for k in self.store.iter_keys(self.prefix) if not k.endswith("/")]
        return keys, {}

    def read_text(self, rel: str) -> str:
        return decoded_text(self.store.get_bytes(self.prefix + rel), self.prefix + rel)

    def escapes(self, rel: str) -> bool:
        return False  # keys are plain names; traversal is caught by safe_relative

    def read(self, rel: str) -> bytes:
        """The object's bytes. Refused from its HEAD, before the GET, above max_file_bytes (a landing
        bucket's object may be larger than memory); checked again once read (it may be replaced between)."""
        key = self.prefix + rel
        refuse_oversized(self.store.size(key), self.max_file_bytes)
        data = self.store.get_bytes(key)
        refuse_oversized(len(data), self.max_file_bytes)
        return data


def refuse_oversized(size: int, max_file_bytes: int) -> None:
    if size > max_file_bytes:
        raise SourceError(f"larger than max_file_bytes ({size} bytes > {max_file_bytes})")


def reader_for(source: Source, settings: Settings) -> LocalReader | S3Reader:
    if source.is_s3:
        from pipelines.io.storage import ObjectStore

        bucket, _, prefix = source.location[len("s3://") :].partition("/")
        return S3Reader(ObjectStore.from_settings(settings, bucket=bucket), prefix, settings.max_file_bytes)
    return LocalReader(Path(source.location), settings.max_file_bytes)


def list_files(source: Source, reader: LocalReader | S3Reader) -> list[SourceFile]:
    if source.layout == "csv":
        entries = csv_entries(reader.read_text(source.csv), f"{source.location}/{source.csv}")
    else:
        paths, unlisted = reader.listing()
        entries = folder_entries(paths) + [unlisted_entry(folder, why) for folder, why in unlisted.items()]
    return [
        SourceFile(e.path, e.source_label, e.patient_id, "symlink leads outside the source folder")
        if e.readable and reader.escapes(e.path)
        else e
        for e in entries
    ]


def unlisted_entry(folder: str, why: str) -> SourceFile:
    shown = escaped(folder) or folder
    return SourceFile(shown, shown.split("/")[0], not_read=why)
