"""`stable_seed`: one 63-bit generator seed from a tuple of parts, the same everywhere.

Every seeded draw that must repeat across ranks, processes, resumes and Python versions (Partial-FC
classes, CHEST's triplets, the data stream's per-batch augmentations) derives its seed here.
`hash()` does not qualify: it is salted per process for str and bytes, and its value for tuples of
ints is an implementation detail that changed between CPython versions (3.8's xxHash-based tuple hash).
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A seed in [0, 2**63) from the `str()` of each part (ints, strings), joined by "-".

    The leading 8 bytes of the sha256 digest, little-endian: independent of the process, the
    platform and the interpreter. Parts are meant to be ints and short tags; two tuples whose
    joined strings agree (("1-2", 3) and (1, "2-3")) give the same seed.
    """
    digest = hashlib.sha256("-".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
