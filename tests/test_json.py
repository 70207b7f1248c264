"""
Both JSON backends read and write the wire the same way.
"""

from __future__ import annotations

import json

import pytest

from conftest import documented_responses
from modelslab_async import Text2Img, _json
from modelslab_async._converter import decode_job, request_body


@pytest.fixture(name="backend", params=["json", "orjson"])
def _backend(request):
    """
    Each backend in turn, the original one restored after.
    """
    if request.param == "orjson":
        pytest.importorskip("orjson")
    before = _json.BACKEND
    _json.use(request.param)
    yield request.param
    _json.use(before)


def test_documented_answers_read_alike(backend):
    """Every documented answer decodes the same through either backend."""
    for example in documented_responses():
        raw = json.dumps(example["body"]).encode()

        data = _json.loads(raw)

        assert data == example["body"]
        if data["status"] != "ok":
            assert decode_job(data) == decode_job(example["body"])


def test_bodies_are_compact_json(backend):
    """A request body encodes to JSON the stdlib reads back unchanged."""
    body = request_body(
        Text2Img(prompt="lighthouse✓", width=512, guidance_scale=7.5),
        key="k",
        track_id="t",
    )

    raw = _json.dumps(body)

    assert isinstance(raw, bytes)
    assert json.loads(raw) == body
    assert b" " not in raw


@pytest.mark.parametrize(
    "raw", [b"", b"\xff\xfe", b"{", b"[" * 5000 + b"]" * 5000]
)
def test_bad_bytes_raise_what_the_reader_catches(backend, raw):
    """Bad bytes raise only ValueError or RecursionError."""
    with pytest.raises((ValueError, RecursionError)):
        _json.loads(raw)


def test_nan_is_refused_either_way(backend):
    """NaN is not JSON: orjson refuses it; json's NaN eta reads as none."""
    raw = b'{"status": "processing", "id": 3, "eta": NaN}'

    try:
        data = _json.loads(raw)
    except ValueError:
        assert backend == "orjson"
        return
    job = decode_job(data)
    assert (job.id, job.eta) == ("3", None)
