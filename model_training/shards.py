"""The tar reader for WebDataset shards (img2dataset's layout): members grouped by key, read lazily.

An uncompressed shard is indexed by walking its 512-byte headers and read by offset; a compressed
one (gzip, bzip2, xz) goes through ``tarfile``. Damage ends the shard (what was read before it is
kept) and is reported through ``report.skip``; ``data.read_webdataset`` turns the groups into samples.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Protocol

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class TruncatedImage(OSError):
    """The image's bytes end early (a shard cut off inside it)."""


class Skips(Protocol):
    def skip(self, reason: str, where: str, n: int = 1) -> None: ...


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:  # a shard cut off inside this member
        raise TruncatedImage(f"{path}: {size - len(data)} bytes missing at {offset}")
    return data


SMALL_MEMBER = 64 * 1024  # captions and metadata are read as the index passes; images only when decoded
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_entries(path: Path) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, data offset, size, data if small) of each regular file of an uncompressed tar.

    A reader of the tar format's 512-byte headers (ustar, GNU long names, pax paths), not
    ``tarfile``: that one spends about 0.16 ms of Python per header, which made a metadata
    pass over 100,000 samples take 47 s; this one reads a header and, for a small member,
    its data in one ``read`` and skips an image's bytes with a seek.
    """
    size_on_disk = os.path.getsize(path)
    with open(path, "rb") as f:
        pos, long_name = 0, None
        while pos + 512 <= size_on_disk:
            f.seek(pos)
            head = f.read(512)
            if head.count(0) == 512:
                return  # the end-of-archive blocks
            try:
                stored = _octal(head[148:156])
                size = _octal(head[124:136])
            except ValueError:
                raise tarfile.ReadError(f"{path}: not a tar header at byte {pos}") from None
            if stored != sum(head[:148]) + 256 + sum(head[156:]):
                raise tarfile.ReadError(f"{path}: bad header checksum at byte {pos}")
            kind, data_at = head[156:157], pos + 512
            pos = data_at + (size + 511) // 512 * 512
            if kind in (b"L", b"x"):  # a long name for the next member (GNU, or a pax 'path' record)
                meta = f.read(size)
                if kind == b"L":
                    long_name = meta.split(b"\0", 1)[0].decode("utf-8", "replace")
                else:
                    for rec in meta.decode("utf-8", "replace").split("\n"):
                        key, _, value = rec.partition(" ")[2].partition("=")
                        if key == "path":
                            long_name = value
                continue
            if kind not in (b"0", b"\0", b"7"):
                long_name = None
                continue  # folders, links, global headers
            name = long_name
            if name is None:
                name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                prefix = head[345:500].split(b"\0", 1)[0]
                if head[257:263] == b"ustar\x00" and prefix:  # POSIX ustar; GNU's magic keeps times there
                    name = prefix.decode("utf-8", "replace") + "/" + name
            long_name = None
            # captions and metadata are read now (the next header is right behind them); an image
            # whatever its size only when a worker decodes it, so a shuffle buffer never holds one
            ext = name.rpartition(".")[2].lower()
            data = f.read(size) if size <= SMALL_MEMBER and ext not in IMAGE_EXTS else None
            yield name, data_at, size, data
        if pos < size_on_disk:
            raise EOFError(f"{path}: ends inside a header")


def tar_groups(shard: Path, report: Skips) -> Iterator[tuple[str, dict[str, Callable[[], bytes]]]]:
    """(key, {ext: reader}) for each run of members that share a key, as img2dataset writes them.

    An uncompressed shard is read by offsets: an image's bytes are read only when asked for.
    A compressed one cannot be seeked cheaply, so ``tarfile`` reads its members as they pass.
    """
    try:
        with open(shard, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        report.skip(f"corrupt shard ({type(exc).__name__})", str(shard))
        return
    entries = _tar_entries(shard) if not magic.startswith(_COMPRESSED) else _compressed_entries(shard)
    file_size = os.path.getsize(shard)
    key: str | None = None
    parts: dict[str, Callable[[], bytes]] = {}
    try:
        for name, offset, size, data in entries:
            k, _, ext = name.rpartition("/")[2].partition(".")
            if k != key and parts:
                assert key is not None
                yield key, parts
                parts = {}
            key = k
            if data is None and offset + size > file_size:
                raise EOFError(f"{name} is truncated")
            if data is not None:
                if len(data) != size:
                    raise EOFError(f"{name} is truncated")
                parts[ext.lower()] = partial(bytes, data)
            else:
                parts[ext.lower()] = partial(_read_range, shard, offset, size)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        # keep what was read before the damage (the damaged sample is dropped); count the shard
        report.skip(f"corrupt shard ({type(exc).__name__})", str(shard))
        return
    if parts and key is not None:
        yield key, parts


def _compressed_entries(shard: Path) -> Iterator[tuple[str, int, int, bytes | None]]:
    with tarfile.open(shard, "r:*") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:  # tarfile reads a cut-off member short, silently
                    raise EOFError(f"{member.name} is truncated")
                yield member.name, member.offset_data, member.size, data
