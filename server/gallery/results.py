"""Results of the gallery operations (enroll, identify, verify, compare, listing, import).

Frozen dataclasses returned by :class:`facegallery.server.gallery.manager.GalleryManager`; the servicer
turns them into protobuf messages. Distances are Euclidean (L2) between embeddings.
"""

from __future__ import annotations

import dataclasses
import math

from facegallery.server.contract.face import Face
from facegallery.server.gallery.index import IdentityHit
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
]


@dataclasses.dataclass(frozen=True)
class Match:
    """A candidate identity: L2 ``distance`` from the probe to its nearest template ``template_id``."""

    identity_id: str
    display_name: str
    distance: float
    template_id: int

    @classmethod
    def from_hit(cls, hit: IdentityHit) -> Match:
        """The match of one identity found by an index search (index.py)."""
        return cls(hit.identity_id, hit.display_name, hit.distance, hit.template_id)


@dataclasses.dataclass(frozen=True, eq=False)
class EnrollResult:
    """An enrolled template.

    ``face`` is None for an enrolled embedding; ``possible_duplicate`` the nearest *other*
    identity when within the gallery threshold; ``source_sha256`` hex of the image bytes or ``""``.
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

    ``matches`` ranked by distance (at most top_k, over-threshold ones included; empty for an
    empty gallery); ``identity_id`` the decision (nearest identity when its distance <=
    ``threshold``, else None = unknown); ``distance`` to the nearest identity (+inf when none).
    """

    face: Face | None
    matches: list[Match]
    identity_id: str | None
    distance: float
    threshold: float

    @classmethod
    def from_hits(cls, face: Face | None, hits: list[IdentityHit], threshold: float) -> Identification:
        """Decide on ranked index ``hits`` (nearest first) with the L2 ``threshold``."""
        matches = [Match.from_hit(h) for h in hits]
        distance = matches[0].distance if matches else math.inf
        decision = matches[0].identity_id if matches and distance <= threshold else None
        return cls(face, matches, decision, distance, threshold)


@dataclasses.dataclass(frozen=True, eq=False)
class Verification:
    """1:1 result: L2 distance of the probe's largest face to the identity's nearest template."""

    identity_id: str
    distance: float
    threshold: float
    is_match: bool
    face: Face
    probability_same: float | None


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """L2 distance between the largest faces of two images."""

    distance: float
    threshold: float
    is_match: bool
    face_a: Face
    face_b: Face
    probability_same: float | None


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
