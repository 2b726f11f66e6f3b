"""Split groups: which images must share a split, from a source's ``group_by`` (and ``group_block``).

A group is the unit the split ledger assigns: all of its images land in one split, so near-identical
captures of one patient or slide cannot sit in train and test at once. A source names its grouping
in one of three forms:

* ``patient``: the csv layout's ``patient_id`` column.
* ``source``: the whole source is one group.
* ``regex:<pattern>``: ``re.search`` over the file's path relative to the source (posix separators).
  The group key is the match's capture groups joined by ``/`` (the whole match when there are none).
  With ``group_block: N`` the group named ``key`` must be digits and stands for ``int(key) // N``, so
  file numbers 000–019 form block 0, 020–039 block 1, ...

For the ALL set (``Benign/WBC-Benign-001.jpg``), ``regex:^([^/]+)/.*?(?P<key>\\d+)\\.\\w+$`` with block
20 groups twenty consecutive captures of one class: ``Benign/0``, ``Benign/1``, ...
A file the pattern does not match has no group (it is split on its own, and the snapshot warns).

A source may also set its own **split shares** (``split_shares: {train: 0.5, val: 0.1, test: 0.4}``): a
new lab with 100 labelled images gets ~10 test images at 80/10/10, too few for any per-site check, so it
holds out more. The shares are part of the grouping: changing them starts a new ledger version in which
that source's images are placed again (the split ledger never moves an image within a version).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

from pipelines.core.errors import LeukopsError

GROUP_KINDS = ("patient", "source")
SPLITS = ("train", "val", "test")
DEFAULT_SHARES = (0.8, 0.1, 0.1)
SPLIT_SHARES = dict(zip(SPLITS, DEFAULT_SHARES, strict=True))
REGEX_PREFIX = "regex:"
BLOCK_GROUP = "key"


class GroupSpecError(LeukopsError):
    """A grouping is not understood; the caller prefixes the source file it came from."""


@dataclass(frozen=True)
class GroupSpec:
    """A source's grouping: ``by`` (None, ``patient``, ``source`` or ``regex:...``) and the block size."""

    by: str | None = None
    block: int | None = None
    split: tuple[float, float, float] | None = None  # train/val/test shares; None = 80/10/10

    def __post_init__(self) -> None:
        if self.split is not None:
            self._check_split()
        if self.by not in (None, *GROUP_KINDS) and not str(self.by).startswith(REGEX_PREFIX):
            raise GroupSpecError(
                f"group_by {self.by!r} is not one of {', '.join(GROUP_KINDS)}, 'regex:<pattern>' or empty"
            )
        if self.block is not None:
            self._check_block()
        if self.is_regex:
            self.pattern  # noqa: B018 - compiles now so a bad pattern fails where the source is defined

    @property
    def is_regex(self) -> bool:
        return str(self.by).startswith(REGEX_PREFIX)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        text = str(self.by)[len(REGEX_PREFIX) :]
        if not text:
            raise GroupSpecError("group_by 'regex:' has an empty pattern")
        try:
            compiled = re.compile(text)
        except re.error as err:
            raise GroupSpecError(f"group_by pattern {text!r} is not a valid regular expression: {err}") from None
        if self.block is not None and BLOCK_GROUP not in compiled.groupindex:
            raise GroupSpecError(
                f"group_block {self.block} needs a named group (?P<{BLOCK_GROUP}>\\d+) in the pattern {text!r}"
            )
        return compiled

    def _check_block(self) -> None:
        if not self.is_regex:
            raise GroupSpecError(f"group_block applies to group_by 'regex:<pattern>', not to {self.by!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise GroupSpecError(f"group_block {self.block!r} must be a whole number ≥ 1")

    def _check_split(self) -> None:
        shares = self.split
        if len(shares) != len(SPLITS) or any(isinstance(s, bool) or not 0 <= s <= 1 for s in shares):
            raise GroupSpecError(f"split_shares {shares!r} must be three numbers in [0, 1] for {'/'.join(SPLITS)}")
        if abs(sum(shares) - 1) > 1e-6:
            raise GroupSpecError(f"split_shares {shares!r} must add up to 1 (they add up to {sum(shares):.4f})")
        if shares[0] == 0:
            raise GroupSpecError(f"split_shares {shares!r}: a train share of 0 is a holdout; register role holdout")

    @property
    def shares(self) -> dict[str, float]:
        return shares_of(self.split)

    @property
    def spec(self) -> str:
        """The grouping as one comparable string, recorded on each ledger row (ungrouped too); the split
        shares appear only when a source sets them, so older ledger rows keep comparing equal."""
        spec = {"group_by": self.by, "group_block": self.block}
        if self.split is not None and tuple(self.split) != DEFAULT_SHARES:
            spec["split"] = list(self.split)
        return json.dumps(spec)

    def key(self, source: str, path: str | None, patient_id: str | None) -> str | None:
        """``<source>:<key>`` of a file, or None when it has no group."""
        if self.by == "source":
            return source
        if self.by == "patient":
            return f"{source}:{patient_id}" if patient_id else None
        if self.is_regex and path:
            found = self.path_key(path)
            return f"{source}:{found}" if found is not None else None
        return None

    def path_key(self, path: str) -> str | None:
        match = self.pattern.search(path)
        if match is None:
            return None
        if not match.groups():
            return match.group(0)
        parts = list(match.groups(default=""))
        if self.block is not None:
            number = match.group(BLOCK_GROUP)
            if not number or not number.isdigit():
                return None
            parts[self.pattern.groupindex[BLOCK_GROUP] - 1] = str(int(number) // self.block)
        return "/".join(parts)


def shares_of_spec(spec: str | None) -> dict[str, float]:
    """The split shares a ledger row's recorded grouping (`GroupSpec.spec`) asks for; 80/10/10 if none."""
    return shares_of(json.loads(spec).get("split") if isinstance(spec, str) and spec else None)


def shares_of(split) -> dict[str, float]:
    """split name → share of a (train, val, test) sequence; None = 80/10/10."""
    return dict(zip(SPLITS, split, strict=True)) if split else dict(SPLIT_SHARES)


def preview(spec: GroupSpec, paths: list[str], examples: int = 5) -> dict:
    """How a pattern groups a listing: number of groups, the largest, and files it does not match."""
    keys = {p: spec.path_key(p) for p in paths}
    unmatched = [p for p, k in keys.items() if k is None]
    sizes: dict[str, int] = {}
    for k in keys.values():
        if k is not None:
            sizes[k] = sizes.get(k, 0) + 1
    largest = max(sizes, key=sizes.get) if sizes else None
    return {
        "files": len(paths),
        "groups": len(sizes),
        "largest_group": largest,
        "largest_group_files": sizes.get(largest, 0),
        "unmatched": len(unmatched),
        "unmatched_examples": unmatched[:examples],
    }
