"""Results of the gallery operations (enroll, identify, verify, compare, listing, import, duplicates).

Frozen dataclasses returned by :class:`facegallery.server.gallery.manager.GalleryManager`; the servicer
turns them into protobuf messages. Distances are Euclidean (L2) between embeddings; scores are
distances or S-norm scores (decision.py ``ScoreKind``), lower = more similar.
"""

from __future__ import annotations

import dataclasses
import math

from facegallery.server.contract.face import Face
from facegallery.server.gallery.decision import Calibration, ScoreKind
from facegallery.server.gallery.open_set import ScoredHit
from facegallery.server.gallery.store import IdentityRecord

__all__ = [
    "Match",
    "EnrollResult",
    "Identification",
    "Verification",
    "Comparison",
    "IdentityPage",
    "GalleryDeletion",
    "ImportResult",
    "DuplicatePair",
]


@dataclasses.dataclass(frozen=True)
class Match:
    """A candidate identity: L2 ``distance`` from the probe to its nearest template ``template_id``,
    and its ``score`` (the S-norm score where the gallery normalises, else the distance)."""

    identity_id: str
    display_name: str
    distance: float
    template_id: int
    score: float

    @classmethod
    def from_scored(cls, scored: ScoredHit) -> Match:
        """The match of one scored identity (open_set.py)."""
        hit = scored.hit
        return cls(hit.identity_id, hit.display_name, hit.distance, hit.template_id, scored.score)


@dataclasses.dataclass(frozen=True, eq=False)
class EnrollResult:
    """An enrolled template.

    ``face`` is None for an enrolled embedding; ``possible_duplicate`` the best-scored *other*
    identity when the gallery's policy would accept it as this template's person (the rule of
    ``Identify``); ``source_sha256`` hex of the image bytes or ``""``.
    """

    identity_id: str
    template_id: int
    face: Face | None
    identity_created: bool
    possible_duplicate: Match | None
    source_sha256: str


@dataclasses.dataclass(frozen=True, eq=False)
class Identification:
    """The 1:N search result of one probe.

    ``matches`` ranked by score, best first (at most top_k, rejected ones included; empty for an
    empty gallery); ``identity_id`` the decision: the best match when its ``score`` <=
    ``threshold``, else None (unknown); ``distance`` and ``score`` those of the best match (+inf
    when none); ``score_kind`` what scores are (decision.py); ``estimated_fpir`` the estimated
    probability that a person who is not enrolled scores this well against someone in the
    gallery (decision.py ``Calibration.estimated_fpir``; 0 for an empty gallery).
    """

    face: Face | None
    matches: list[Match]
    identity_id: str | None
    distance: float
    threshold: float
    score: float
    score_kind: ScoreKind
    estimated_fpir: float

    @classmethod
    def decide(cls, face: Face | None, scored: list[ScoredHit], calibration: Calibration, threshold: float | None = None) -> Identification:
        """Decide on ``scored`` candidates (best first) with the calibration's threshold, or
        ``threshold`` (on the same score scale) when given."""
        threshold = calibration.threshold if threshold is None else threshold
        matches = [Match.from_scored(s) for s in scored]
        best = matches[0] if matches else None
        score = best.score if best else math.inf
        decision = best.identity_id if best and score <= threshold else None
        estimated = calibration.estimated_fpir(score) if best else 0.0
        return cls(face, matches, decision, best.distance if best else math.inf, threshold, score, calibration.score_kind, estimated)


@dataclasses.dataclass(frozen=True, eq=False)
class Verification:
    """1:1 result: L2 distance of the probe's largest face to the identity's nearest template.

    ``estimated_far`` the model's false-match rate at that distance (the share of pairs of
    different people that close, ``model.json`` ``false_match``), None when the model has none.
    """

    identity_id: str
    distance: float
    threshold: float
    is_match: bool
    face: Face
    probability_same: float | None
    estimated_far: float | None


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """L2 distance between the largest faces of two images; ``estimated_far`` as for Verification."""

    distance: float
    threshold: float
    is_match: bool
    face_a: Face
    face_b: Face
    probability_same: float | None
    estimated_far: float | None


@dataclasses.dataclass(frozen=True)
class IdentityPage:
    """One page of identities in enrollment order; ``next_page_token`` is ``""`` on the last page."""

    identities: list[IdentityRecord]
    next_page_token: str


@dataclasses.dataclass(frozen=True)
class GalleryDeletion:
    """What deleting a gallery removed."""

    deleted_identities: int
    deleted_templates: int


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """Templates imported, and templates skipped because the identity already had that embedding."""

    imported: int
    skipped: int


@dataclasses.dataclass(frozen=True)
class DuplicatePair:
    """Two enrolled identities the gallery's policy would confuse: identity_b is the best-scored
    other identity of identity_a's first template, within the decision threshold. ``score`` on the
    gallery's scale, ``distance`` L2, ``estimated_fpir`` as for an Identification."""

    identity_a: str
    display_name_a: str
    identity_b: str
    display_name_b: str
    score: float
    distance: float
    estimated_fpir: float
