"""What ``verify`` concludes: a verdict, the findings (by kind, each naming its key), and the counts behind them.

Findings are counted in full and kept up to ``KEEP_PER_KIND`` of each kind, so an export where every object is
wrong costs the verifier a bounded list, not one entry per object."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

KEEP_PER_KIND = 200


class Verdict(str, enum.Enum):
    """``safe``: every check passed (exit 0). ``unsafe``: findings (exit 1). ``cannot_verify``: the export could not
    be checked as a whole (no or damaged manifest, another tool's manifest, unreadable objects, a run still writing:
    exit 2)."""

    SAFE = "safe"
    UNSAFE = "unsafe"
    CANNOT_VERIFY = "cannot_verify"

    @property
    def exit_code(self) -> int:
        return {Verdict.SAFE: 0, Verdict.UNSAFE: 1, Verdict.CANNOT_VERIFY: 2}[self]


class Kind(str, enum.Enum):
    """What is wrong with one key."""

    EXTRA = "extra"  # an object outside the manifest folder that no latest manifest row wrote
    MISSING = "missing"  # a latest row says it wrote this output, and it is not there
    ALTERED = "altered"  # the object's sha256 is not the one its row recorded
    UNHASHED = "unhashed"  # its row recorded no sha256 (a run before hashes existed): the bytes cannot be vouched for
    OUTSIDE = "outside"  # a row's output_uri does not lie under the export
    IDENTITY_EXPORTED = "identity_exported"  # a row says the written pixels still carry the identity
    FACE_NOT_ANONYMIZED = "face_not_anonymized"  # a face row of a written image with no destroying/regenerating method
    METADATA = "metadata"  # EXIF, XMP, IPTC, ICC, comments, thumbnails read back from the bytes
    ORIGINALS = "originals"  # a file in the manifest folder that embeds original faces (or is an image)
    MISSED_FACE = "missed_face"  # --audit-faces: a face found on an output outside every recorded anonymized box
    UNREADABLE = "unreadable"  # an object that could not be read: the export cannot be vouched for

    @property
    def blocks_verification(self) -> bool:
        return self is Kind.UNREADABLE


@dataclass(frozen=True)
class Finding:
    kind: Kind
    key: str
    detail: str = ""

    def as_json(self) -> dict:
        return {"kind": self.kind.value, "key": self.key, "detail": self.detail}


@dataclass
class Findings:
    """Findings counted per kind, the first ``KEEP_PER_KIND`` of each kept."""

    counts: dict[str, int] = field(default_factory=dict)
    kept: list[Finding] = field(default_factory=list)

    def add(self, kind: Kind, key: str, detail: str = "") -> None:
        n = self.counts.get(kind.value, 0)
        self.counts[kind.value] = n + 1
        if n < KEEP_PER_KIND:
            self.kept.append(Finding(kind, key, detail))

    def __bool__(self) -> bool:
        return bool(self.counts)

    def blocking(self) -> bool:
        return any(Kind(k).blocks_verification for k in self.counts)


class CannotVerify(Exception):
    """The export cannot be checked as a whole; the message is the one-line verdict."""


class ExportBusy(CannotVerify):
    """A run is still writing the export (its lease is live)."""
