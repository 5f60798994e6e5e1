"""image_key checks a claimed sha256 against the image's bytes; bytes verified lately are
recognized by comparing them instead of hashing them again, with the same answers."""
from __future__ import annotations

import hashlib

import pytest

from llm_service import embedding_cache
from llm_service.embedding_cache import VerifiedDigests, image_key
from protos import common_pb2

DATA = b"\x89PNG" + bytes(range(256)) * 40


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_verified_before_are_compared_not_hashed(monkeypatch):
    other = DATA[:-1] + b"!"
    digest, other_digest = _sha(DATA), _sha(other)
    hashed = []
    sha256 = hashlib.sha256
    monkeypatch.setattr(embedding_cache.hashlib, "sha256", lambda data: hashed.append(len(data)) or sha256(data))
    verified = VerifiedDigests()
    assert verified.digest(DATA, digest) == digest and len(hashed) == 1
    assert verified.digest(bytes(bytearray(DATA)), digest) == digest and len(hashed) == 1  # a copy: compared
    assert verified.digest(DATA) == digest and len(hashed) == 2  # nothing claimed: hashed
    assert verified.digest(other, digest) == other_digest and len(hashed) == 3  # a known claim, other bytes


def test_a_wrong_claim_is_rejected_even_for_bytes_seen_before():
    image = common_pb2.ImageInput(data=DATA, sha256=_sha(DATA).upper())
    assert image_key(image) == image_key(image) == _sha(DATA)
    with pytest.raises(ValueError, match="does not match"):
        image_key(common_pb2.ImageInput(data=DATA, sha256="0" * 64))
    with pytest.raises(ValueError, match="does not match"):
        image_key(common_pb2.ImageInput(data=DATA + b"!", sha256=_sha(DATA)))
    assert image_key(common_pb2.ImageInput(data=DATA, sha256=_sha(DATA), options={"detail": "low"})) == \
        _sha(DATA) + "|detail=low"


def test_at_most_max_bytes_are_kept_least_recently_used_out():
    verified = VerifiedDigests(max_bytes=250)
    a, b, c, d = (bytes([i]) * 100 for i in range(4))
    for data in (a, b, c):
        verified.digest(data)
    assert list(verified._entries) == [_sha(b), _sha(c)]
    verified.digest(b, _sha(b))  # a hit is the most recent now
    verified.digest(d)
    assert list(verified._entries) == [_sha(b), _sha(d)]
    assert verified.digest(b"x" * 300) == _sha(b"x" * 300) and len(verified) == 2  # too big to keep


def test_new_bytes_are_hashed_off_the_event_loop_and_resent_ones_compared_on_it(monkeypatch):
    """A burst of new images must not hold the loop that hands earlier requests their embeddings."""
    import asyncio
    import threading

    from llm_service.embedding_cache import image_keys

    data = DATA + b"off-loop"
    digest = _sha(data)
    threads = []
    sha256 = hashlib.sha256
    monkeypatch.setattr(embedding_cache.hashlib, "sha256",
                        lambda d: threads.append(threading.current_thread()) or sha256(d))
    monkeypatch.setattr(embedding_cache, "_VERIFIED", VerifiedDigests())
    images = [common_pb2.ImageInput(data=data, sha256=digest), common_pb2.ImageInput(sha256="ab" * 32)]

    async def keys():
        return threading.current_thread(), await image_keys(images)

    loop_thread, first = asyncio.run(keys())
    assert first == [digest, "ab" * 32]
    assert len(threads) == 1 and threads[0] is not loop_thread  # hashed, on the pool
    assert asyncio.run(keys())[1] == first and len(threads) == 1  # re-sent: compared, not hashed
    with pytest.raises(ValueError, match="does not match"):
        asyncio.run(image_keys([common_pb2.ImageInput(data=data + b"!", sha256=digest)]))
