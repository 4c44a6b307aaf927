"""A bound on a JSON document's parse cost, checked before the parse.

A JSON parser holds the GIL for the whole document, in a thread too, so a body of millions of tiny
elements (``[1,1,1,...]``, 32 MB) freezes every request of its worker for seconds. What costs is the
number of values, not the bytes: a 10 MB base64 string parses in milliseconds. Every value after
the first in an array or object follows a ``,``, and the first follows a ``[`` or ``{``, so
counting those three bytes bounds the values from above; inside strings they count too (a
caption's commas), which only makes the bound looser. ``bytes.count`` runs at memory speed: a
32 MB body is scanned in a few milliseconds.
"""

from __future__ import annotations


def json_values_bound(body: bytes | memoryview) -> int:
    """At least the number of values and members in ``body`` (an upper bound, never an undercount)."""
    data = bytes(body) if isinstance(body, memoryview) else body
    return data.count(b",") + data.count(b"[") + data.count(b"{") + 1


def max_json_values(max_rows: int, max_description_chars: int, extra: int = 0) -> int:
    """What a legitimate document of ``max_rows`` rows can hold: per row an image, a caption whose
    characters might all be commas, and a few keys; ``extra`` for a protocol's other values."""
    return max_rows * (max_description_chars + 16) + extra + 1024
