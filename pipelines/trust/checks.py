"""One gate check: a claim (what, its point estimate, the one-sided bound judged, the images it rests on)
judged against a threshold. Shared by the gate (`pipelines.trust.gate`) and its per-site checks
(`pipelines.trust.sites`).

A check resting on fewer than ``min_check_images`` is "insufficient evidence" and fails, as does a claim
that was never measured; a *reported* check (``gated=False``: a site too small to judge) passes and says
why it was not judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.core.settings import GateThresholds

CheckKind = Literal["value", "change"]


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None  # the judged statistic: a one-sided bound (or the mean, for explanation checks)
    threshold: float
    passed: bool
    kind: CheckKind
    detail: str
    n: int | None = None  # images the check rests on
    point: float | None = None  # the point estimate the bound belongs to
    gated: bool = True  # False: reported beside the gate, never refuses (e.g. a site below min_check_images)


@dataclass(frozen=True)
class Claim:
    """One check before judging: what is claimed, by which statistic, on how many images."""

    name: str
    what: str
    point: float | None
    bound: float | None
    n: int | None
    how: str  # how the bound was obtained, for the detail


def judge(claim: Claim, threshold: float, t: GateThresholds, *, floor: bool, kind: CheckKind = "value") -> Check:
    def check(passed: bool, detail: str) -> Check:
        return Check(claim.name, claim.bound, threshold, passed, kind, detail, claim.n, claim.point)

    if claim.bound is None:
        return check(False, f"{claim.what} was not measured")
    rests = "" if claim.n is None else f"; rests on {claim.n} images"
    if claim.n is not None and claim.n < t.min_check_images:
        return check(False, f"insufficient evidence: {claim.what} rests on {claim.n} images (< {t.min_check_images})")
    op, passed = (">=", claim.bound >= threshold) if floor else ("<=", claim.bound <= threshold)
    return check(
        passed, f"{claim.what} {num(claim.point)}, {claim.how} {claim.bound:.4f} must be {op} {threshold:.4f}{rests}"
    )


def reported(claim: Claim, threshold: float, why: str, *, kind: CheckKind = "value") -> Check:
    """A check shown beside the gate but not judged (it passes): ``why`` says why it is not gated."""
    figure = "" if claim.point is None else f"; {claim.what} {num(claim.point)}"
    detail = f"reported, not gated: {why}{figure}"
    return Check(claim.name, claim.bound, threshold, True, kind, detail, claim.n, claim.point, gated=False)


def num(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def bound_name(t: GateThresholds) -> str:
    return f"one-sided {t.confidence:.0%}"
