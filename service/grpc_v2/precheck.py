"""Counts in a ``ModelInferRequest`` read off the wire format, before protobuf parses it.

Parsing is where a small message becomes a large object graph: 16 MB of empty ``bytes_contents``
elements parse into 8 million Python-visible strings (+400 MB, 0.15 s of the event loop), and a
check on the parsed message comes too late to save either. This walks the protobuf wire format's
tags and lengths only (length-delimited payloads are skipped, never copied), so its cost is bounded
by the caps it checks, not by the message's size, and it stops at the first count past a cap.

The field numbers are the protocol's (``inference.proto``); a field this does not know is skipped,
as protobuf itself would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# ModelInferRequest
_REQ_PARAMETERS, _REQ_INPUTS, _REQ_OUTPUTS, _REQ_RAW = 4, 5, 6, 7
# ModelInferRequest.InferInputTensor
_IN_SHAPE, _IN_PARAMETERS, _IN_CONTENTS = 3, 4, 5
# ModelInferRequest.InferRequestedOutputTensor
_OUT_PARAMETERS = 2
# InferTensorContents: field -> bytes per element when packed (0: varints, None: length-delimited elements)
_CONTENTS: dict[int, int | None] = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 4, 7: 8, 8: None}
_CONTINUATION = bytes(range(128, 256))  # varint bytes that are not a varint's last


class Malformed(ValueError):
    """Not a protobuf message, or a count past a cap: the message says which."""


@dataclass(frozen=True)
class Caps:
    tensors: int  # inputs, requested outputs, raw_input_contents: each
    elements: int  # typed content elements, over every field of one input
    parameters: int  # entries of each parameters map
    dims: int  # shape dimensions of one input


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise Malformed("the message is not valid protobuf (a truncated or overlong varint)")


MAX_FIELDS = 1024  # fields of one message besides its counted ones (a real request has a dozen)


def _fields(buf: bytes, start: int, end: int, limit: int = MAX_FIELDS) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, payload start, payload end) of each field in buf[start:end]; at most
    ``limit`` of them (a message of a million repeated unknown fields costs nothing to reject)."""
    pos = start
    seen = 0
    while pos < end:
        seen += 1
        if seen > limit:
            raise Malformed(f"the message has more than {limit} fields")
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise Malformed("the message is not valid protobuf (field number 0)")
        if wire == 0:
            at = pos
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            at, pos = pos, pos + 8
        elif wire == 2:
            n, at = _varint(buf, pos, end)
            pos = at + n
        elif wire == 5:
            at, pos = pos, pos + 4
        else:  # groups (3, 4) are not in proto3 messages; 6 and 7 do not exist
            raise Malformed(f"the message is not valid protobuf (wire type {wire})")
        if pos > end:
            raise Malformed("the message is not valid protobuf (a field runs past its message)")
        yield field, wire, at, pos


def _count(kind: str, n: int, cap: int) -> None:
    if n > cap:
        raise Malformed(f"{kind}: more than {cap}")


def check_infer_request(buf: bytes, caps: Caps) -> None:
    """Raise ``Malformed`` when the message is not protobuf or a count passes its cap."""
    counts = {_REQ_PARAMETERS: 0, _REQ_INPUTS: 0, _REQ_OUTPUTS: 0, _REQ_RAW: 0}
    names = {_REQ_PARAMETERS: ("parameters", caps.parameters), _REQ_INPUTS: ("inputs", caps.tensors),
             _REQ_OUTPUTS: ("requested outputs", caps.tensors), _REQ_RAW: ("raw_input_contents", caps.tensors)}
    for field, wire, start, end in _fields(buf, 0, len(buf), MAX_FIELDS + 3 * caps.tensors + caps.parameters):
        if field not in counts:
            continue
        counts[field] += 1
        kind, cap = names[field]
        _count(kind, counts[field], cap)
        if wire != 2:
            raise Malformed(f"the message is not valid protobuf ({kind} is not length-delimited)")
        if field == _REQ_INPUTS:
            _check_input(buf, start, end, caps)
        elif field == _REQ_OUTPUTS:
            n = sum(1 for f, *_ in _fields(buf, start, end, MAX_FIELDS + caps.parameters) if f == _OUT_PARAMETERS)
            _count("parameters of a requested output", n, caps.parameters)


def _check_input(buf: bytes, start: int, end: int, caps: Caps) -> None:
    dims = params = elements = 0
    for field, wire, s, e in _fields(buf, start, end, MAX_FIELDS + caps.dims + caps.parameters):
        if field == _IN_SHAPE:
            dims += len(buf[s:e].translate(None, _CONTINUATION)) if wire == 2 else 1  # packed or not
            _count("shape dimensions of an input", dims, caps.dims)
        elif field == _IN_PARAMETERS:
            params += 1
            _count("parameters of an input", params, caps.parameters)
        elif field == _IN_CONTENTS and wire == 2:
            # counted over every copy: protobuf merges repeated copies of a message field into one
            elements = _check_contents(buf, s, e, caps, elements)


def _check_contents(buf: bytes, start: int, end: int, caps: Caps, elements: int) -> int:
    """``elements`` so far in this input, plus this copy's; Malformed past the cap."""
    for field, wire, s, e in _fields(buf, start, end, MAX_FIELDS + caps.elements):
        if field not in _CONTENTS:
            continue
        width = _CONTENTS[field]
        if wire != 2 or width is None:
            elements += 1  # one element per field: unpacked numbers, or one bytes_contents element
        elif width:
            elements += (e - s) // width
        else:
            elements += len(buf[s:e].translate(None, _CONTINUATION))  # packed varints: one last byte each
        _count("elements in an input's contents", elements, caps.elements)
    return elements
