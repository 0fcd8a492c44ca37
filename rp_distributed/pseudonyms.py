"""The pseudonym key and what is derived from it (shared/ALGORITHM.md, "Pseudonyms").

The key is read on the driver only, where the subject table is joined into the plan: each table row's subject
becomes ``HMAC-SHA256(key, subject)`` there, and only that digest travels with the plan. Neither the key nor a
subject ever reaches a worker, the object store, a log or an output. From the digest a worker derives the
subject's pseudonym embedding (``embedding``: the same on every node, batch and rerun), and the manifest records
its first ``ID_HEX`` hex digits as ``pseudonym_id``.

A subject is often guessable (a patient number, a name); the key is what keeps ``pseudonym_id`` from being
reversed by trying them all, hence its least length."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import numpy as np

from .config.job import ConfigError

KEY_MIN_BYTES = 16
ID_HEX = 16  # pseudonym_id: 64 bits of the digest (a collision among 1M subjects: about 3e-8)
EMBEDDING_DIM = 512
_FINGERPRINT_MESSAGE = b"rp-distributed fingerprint"
_STREAM_DOMAIN = b"rp-distributed pseudonym embedding v1"


class PseudonymKeyError(ConfigError):
    """The subject table is set and its key cannot be used (absent, empty, too short). Never names the key."""


def read_key(cfg) -> bytes | None:
    """The pseudonym key of a ``PseudonymsConfig`` (None without a subject table): ``key_file``'s bytes (one
    trailing line break dropped) if set, else the environment variable ``key_env``."""
    if not cfg.table:
        return None
    if cfg.key_file:
        path = Path(cfg.key_file).expanduser()
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise PseudonymKeyError(f"pseudonyms.key_file: cannot read {path}: {exc.strerror}") from None
        key, where = key[:-1] if key.endswith(b"\n") else key, f"pseudonyms.key_file {path}"
        key = key[:-1] if key.endswith(b"\r") else key
    else:
        key, where = os.environ.get(cfg.key_env, "").encode(), f"environment variable {cfg.key_env} (pseudonyms.key_env)"
    if not key:
        raise PseudonymKeyError(f"pseudonyms.table is set but {where} holds no pseudonym key")
    if len(key) < KEY_MIN_BYTES:
        raise PseudonymKeyError(f"the pseudonym key in {where} is shorter than {KEY_MIN_BYTES} bytes: a short key "
                                "lets pseudonym_id be reversed by trying subjects")
    return key


def key_digest(key: bytes) -> str:
    """What the settings fingerprint holds of the key: changes with the key, reveals nothing of it."""
    return hmac.new(key, _FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:32]


def subject_digest(key: bytes, subject: str) -> str:
    """``HMAC-SHA256(key, subject)`` as 64 hex digits: the seed of the subject's pseudonym."""
    return hmac.new(key, subject.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonym_id(digest: str | None) -> str | None:
    """The manifest's ``pseudonym_id`` of a subject digest (None: the face has no subject)."""
    return digest[:ID_HEX] if digest else None


def embedding(digest: str) -> np.ndarray:
    """The pseudonym embedding ``p`` of a subject digest: a standard Gaussian draw of 512 values seeded by the
    digest, L2-normalised (float32). The draw is SHAKE-256 of the digest read as uniforms through Box-Muller:
    bit for bit the same on every node and numpy version (a library generator's stream may change)."""
    seed = bytes.fromhex(digest)
    if len(seed) != 32:
        raise ValueError("a subject digest is 64 hex digits")
    words = np.frombuffer(hashlib.shake_256(_STREAM_DOMAIN + seed).digest(EMBEDDING_DIM * 8), dtype="<u8")
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53  # 53-bit uniforms in (0, 1)
    u1, u2 = u[: EMBEDDING_DIM // 2], u[EMBEDDING_DIM // 2:]
    r = np.sqrt(-2.0 * np.log(u1))
    g = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return (g / np.linalg.norm(g)).astype(np.float32)


def embeddings(digests: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """[B, 512] pseudonym embeddings (zeros where a face has no subject) and the [B] mask of faces that have one."""
    out = np.zeros((len(digests), EMBEDDING_DIM), np.float32)
    has = np.array([bool(d) for d in digests], bool)
    for i, d in enumerate(digests):
        if d:
            out[i] = embedding(d)
    return out, has
