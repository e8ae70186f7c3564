"""The ingress's HTTP layer in process: bounded upload reads, multipart parsed in memory (a query
photo never spills to a temp file), and Contract 4's JSON errors."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from visual_search import httpapi

BOUNDARY = "XyZ"


def _request(body: bytes, content_type: str, chunk: int = 65536) -> Request:
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive():
        data = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": data, "more_body": bool(chunks)}

    headers = [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": "POST", "path": "/search", "headers": headers}
    return Request(scope, receive)


def _multipart(data: bytes, field: str = "image") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_multipart_over_a_megabyte_stays_in_memory(monkeypatch):
    forms = []
    real = httpapi._InMemoryParser.parse

    async def keep(self):
        forms.append(await real(self))
        return forms[-1]

    monkeypatch.setattr(httpapi._InMemoryParser, "parse", keep)
    photo = bytes(range(256)) * 12_000  # 3 MB: Starlette would spool it to disk past 1 MB
    request = _request(_multipart(photo), f"multipart/form-data; boundary={BOUNDARY}")
    assert asyncio.run(httpapi.read_upload(request, 4 << 20)) == photo
    assert forms and forms[0]["image"].file._rolled is False


def test_raw_body_and_limits():
    photo = b"\xff\xd8" + b"x" * 5000
    assert asyncio.run(httpapi.read_upload(_request(photo, "image/jpeg", 700), 10_000)) == photo
    with pytest.raises(httpapi.ApiError) as err:
        asyncio.run(httpapi.read_upload(_request(b"", "image/jpeg"), 10_000))
    assert (err.value.status, err.value.code) == (400, "bad_request")
    with pytest.raises(httpapi.ApiError) as err:
        big = b"x" * (10_000 + httpapi.MULTIPART_SLACK + 1)
        asyncio.run(httpapi.read_upload(_request(big, "image/jpeg"), 10_000))
    assert (err.value.status, err.value.code) == (413, "too_large")
    # Inside the multipart slack, but the image itself is over the limit.
    with pytest.raises(httpapi.ApiError) as err:
        body = _multipart(b"x" * 10_500)
        asyncio.run(
            httpapi.read_upload(_request(body, f"multipart/form-data; boundary={BOUNDARY}"), 10_000)
        )
    assert err.value.status == 413


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"garbage", f"multipart/form-data; boundary={BOUNDARY}"),
        (b"abc", "multipart/form-data"),
        (_multipart(b"data", field="other"), f"multipart/form-data; boundary={BOUNDARY}"),
    ],
)
def test_malformed_multipart_is_a_400(body, content_type):
    with pytest.raises(httpapi.ApiError) as err:
        asyncio.run(httpapi.read_upload(_request(body, content_type), 10_000))
    assert (err.value.status, err.value.code) == (400, "bad_request")
