"""The multipart fast path agrees with Starlette's general parser, or steps aside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from service.multipart import FilePart, parse_form


def general(body: bytes, content_type: bytes) -> dict[str, list[object]]:
    async def parse() -> dict[str, list[object]]:
        async def stream() -> AsyncIterator[bytes]:
            yield body

        form = await MultiPartParser(Headers(raw=[(b"content-type", content_type)]), stream()).parse()
        out: dict[str, list[object]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.setdefault(key, []).append(FilePart(value.filename or "", value.content_type, await value.read()))
            else:
                out.setdefault(key, []).append(value)
        return out

    return asyncio.run(parse())


def encoded(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, bytes]:
    """What a real client (httpx) sends."""
    req = httpx.Request("POST", "http://x/classify", files=files, data=data)
    return req.read(), req.headers["content-type"].encode()


def test_a_typical_request_takes_the_fast_path() -> None:
    jpeg = b"\xff\xd8" + bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n" + b"\xff\xd9"
    body, ctype = encoded([("image", ("photo.jpg", jpeg, "image/jpeg"))], {"description": "a red tomato on a table"})
    fast = parse_form(body, ctype)
    assert fast == {"image": [FilePart("photo.jpg", "image/jpeg", jpeg)], "description": ["a red tomato on a table"]}
    assert fast == general(body, ctype)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    image=st.binary(max_size=3000),
    description=st.text(max_size=200),
    filename=st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\'), max_size=20),
    extra=st.lists(st.tuples(st.sampled_from(["description", "image", "other"]), st.text(max_size=30)), max_size=3),
)
def test_agrees_with_the_general_parser(image: bytes, description: str, filename: str, extra: list[tuple[str, str]]) -> None:
    data = {"description": description}
    files = [("image", (filename or "x.jpg", image, "image/jpeg"))]
    body, ctype = encoded(files, data)
    for name, value in extra:  # duplicate and unknown fields, appended as text parts
        boundary = ctype.split(b"boundary=")[1]
        part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value.encode()
        body = body.replace(b"--" + boundary + b"--", part + b"\r\n--" + boundary + b"--")
    fast = parse_form(body, ctype)
    assert fast is not None  # what a real client sends takes the fast path...
    assert fast == general(body, ctype)  # ...and gives the general parser's answer


BOUNDARY = b"b0undary"
CTYPE = b"multipart/form-data; boundary=" + BOUNDARY
PART = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\nJPEG'


@pytest.mark.parametrize("body, ctype", [
    (b"preamble\r\n" + PART + b"\r\n--b0undary--\r\n", CTYPE),  # a preamble
    (PART + b"\r\n--b0undary--\r\n", CTYPE + b"; charset=utf-8"),  # a parameter after the boundary
    (PART + b"\r\n--b0undary--\r\n", b"multipart/mixed; boundary=b0undary"),  # another multipart type
    (PART + b"\r\n--b0undary\r\n", CTYPE),  # no closing delimiter
    (PART + b"\r\n--b0undary--\r\nepilogue", CTYPE),  # an epilogue
    (PART.replace(b"Content-Type: image/jpeg", b"Content-Transfer-Encoding: base64"), CTYPE),  # another header
    (PART.replace(b'filename="a.jpg"', b"filename*=UTF-8''%C3%A9.jpg") + b"\r\n--b0undary--", CTYPE),  # RFC 5987 name
    (PART.replace(b'name="image"', b"name=image") + b"\r\n--b0undary--", CTYPE),  # unquoted name
    (b'--b0undary\r\nContent-Disposition: form-data; name="description"\r\n\r\n\xff\xfe\r\n--b0undary--', CTYPE),  # not UTF-8
    ((PART + b"\r\n") * 13 + b"--b0undary--", CTYPE),  # more parts than the general parser allows
    (b'--b0undary\r\nContent-Disposition: form-data; name="description"\r\n\r\n' + b"x" * (1024 * 1024 + 1) + b"\r\n--b0undary--",
     CTYPE),  # a text field over 1 MiB
])
def test_unusual_shapes_fall_back(body: bytes, ctype: bytes) -> None:
    assert parse_form(body, ctype) is None
