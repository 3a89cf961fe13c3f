"""A tar's samples, grouped as webdataset groups them, read by member offset in large pieces.

webdataset streams a tar through Python's `tarfile` (a header object per member, member bytes read
in small pieces and joined): per sample that costs far more than reading the bytes (BENCHMARKS.md,
the tar reader). A local tar is
read here in large pieces instead; member headers are located by their sizes, checked all at once
per piece (checksum and number fields, as `tarfile` checks them), and each member's bytes are a
memoryview into the piece, never copied.

Only ustar headers of regular files and directories, and the pax headers Python's `tarfile` (so
webdataset's writer) puts before them (path, size, times), are read this way, the way `tarfile` reads
them. At anything else (a damaged or truncated tar, global pax or GNU long-name headers, a compressed
tar, a missing end-of-archive block, a duplicate file in a sample) the tar is handed over to
webdataset from that sample on: the samples already given are skipped, so what follows, and any
error webdataset reports, is exactly webdataset's own. Remote tars always go through webdataset.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator

import numpy as np
import webdataset as wds

from rankpipe.pipeline.data.tars import WDS_META, is_remote

# Bytes per read of a local tar (a member larger than this is read whole). Pieces well below glibc's
# largest mmap threshold (32 MiB) reuse freed memory instead of faulting in fresh pages each time.
READ_BYTES = 4 << 20
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# How `tarfile` decodes member names.
_NAME_ENCODING = sys.getfilesystemencoding()
# (start, length) of the header's number fields: mode, uid, gid, size, mtime, chksum, devmajor, devminor.
_NUMBER_FIELDS = ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (329, 8), (337, 8))
# Their columns side by side, the position (among those) of each column's field's first column, and
# where the checksum's columns are.
_FIELD_COLUMNS = np.concatenate([np.arange(start, start + length) for start, length in _NUMBER_FIELDS])
_FIELD_FIRST = np.concatenate([np.full(length, sum(n for _, n in _NUMBER_FIELDS[:i]))
                               for i, (_, length) in enumerate(_NUMBER_FIELDS)])
_CHKSUM_COLUMNS = np.flatnonzero((_FIELD_COLUMNS >= 148) & (_FIELD_COLUMNS < 156))
_REGULAR, _OLD_REGULAR, _DIRECTORY, _PAX = b"0", b"\0", b"5", b"x"
# A pax record, "<length> <keyword>=<value>\n", and the keywords that change nothing read here.
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_PAX_IGNORED = {b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"}
# The pax header Python's `tarfile` writes for a float mtime alone (so before every webdataset
# member): one record of an ignored keyword, read here in one step.
_PAX_LONE_IGNORED = re.compile(rb"(\d+) (?:" + b"|".join(sorted(_PAX_IGNORED)) + rb")=[^\n]*\n")

# webdataset's split of a member name into the sample's key and the extension (`base_plus_ext`),
# compiled once: it runs for every member.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

# A tar read error goes to this; it returns True to go on (webdataset's handler convention).
Handler = Callable[[Exception], bool]


# A sample's {extension: byte offset in the tar file} of its members, where they were read by offset.
FILE_OFFSETS = "__file_offsets__"


def tar_samples(url: str, handler: Handler) -> Iterator[dict]:
    """The samples of a tar as webdataset yields them: {"__key__", "__url__", ..., extension: bytes-like}.

    Values are memoryviews for a local tar read by offset and bytes from webdataset; both hold the
    member's exact bytes. A sample read by offset also has `FILE_OFFSETS`: where each member's bytes
    lie in the file. Read errors go to `handler`, as webdataset's `handler=` gets them.
    """
    if is_remote(url):
        yield from webdataset_samples(url, handler)
        return
    given = 0
    try:
        for sample in _local_samples(url):
            yield sample
            given += 1
        return
    except _HandOver:
        pass
    for position, sample in enumerate(webdataset_samples(url, handler)):
        if position >= given:
            yield sample


def webdataset_samples(url: str, handler: Handler) -> Iterator[dict]:
    """The samples of a tar read by webdataset itself."""
    yield from wds.WebDataset(url, shardshuffle=False, handler=handler, nodesplitter=None, workersplitter=None,
                              empty_check=False)


class _HandOver(Exception):
    """The rest of the tar is for webdataset to read."""


def _local_samples(url: str) -> Iterator[dict]:
    """Samples of a local tar grouped by key (webdataset's `group_by_keys` over its member filter)."""
    key, sample = None, None
    for name, data, offset in _members(url):
        if name.startswith("__") and name.endswith("__") and "/" not in name or WDS_META.match(name):
            continue
        match = _BASE_PLUS_EXT.match(name)
        if match is None:
            continue
        prefix, suffix = match.groups()
        suffix = suffix.lower()
        if sample is None or prefix != key:
            if sample is not None:
                yield sample
            key, sample = prefix, {"__key__": prefix, "__url__": url, "__local_path__": url, FILE_OFFSETS: {}}
        if suffix in sample or suffix.startswith("__"):
            raise _HandOver  # webdataset reports the duplicate (or treats a "__x__" entry its own way)
        sample[suffix] = data
        sample[FILE_OFFSETS][suffix] = offset
    if sample is not None:
        yield sample


def _members(path: str) -> Iterator[tuple[str, memoryview, int]]:
    """(name, bytes, offset of the bytes in the file) of each regular member, read in large pieces;
    raises _HandOver at anything unusual."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, after the last member
    except OSError as e:
        raise _HandOver from e  # webdataset reports the missing file
    with file:
        size = os.fstat(file.fileno()).st_size
        # The piece in memory starts at this offset of the file.
        buf, base, seen = b"", 0, False
        while True:
            scan = _Scan(buf)
            stop, need = scan.run()
            valid = _valid_headers(buf, scan.headers)
            first_invalid = len(valid) if all(valid) else valid.index(False)
            view = memoryview(buf)
            for (last_header, name, start, length, regular) in scan.entries:
                if last_header >= first_invalid:
                    raise _HandOver  # the members before it are given first, as webdataset gives them
                if regular:
                    yield name, view[start:start + length], base + start
            seen = seen or bool(scan.entries)
            if first_invalid < len(valid) or stop is None or (need == 0 and not seen):
                raise _HandOver  # damaged, unusual, or empty: webdataset decides
            if need == 0:
                return  # the end-of-archive block
            # The next piece starts at the member the scan stopped in (re-reading its start is cheaper
            # than joining it to the next piece, which would copy every piece once more).
            base, wanted = base + stop, len(buf) - stop + need
            if base + wanted > size:
                raise _HandOver  # truncated
            file.seek(base)
            buf = file.read(max(READ_BYTES, wanted))
            if len(buf) < wanted:
                raise _HandOver  # the file shrank since it was opened


class _Scan:
    """The members whose headers, bytes and padding lie in one piece of a tar."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        # Offsets of the headers read, for `_valid_headers`.
        self.headers: list[int] = []
        # (index into headers of its last header, name, data offset, size, regular file) per member;
        # its headers are those after the previous member's.
        self.entries: list[tuple[int, str, int, int, bool]] = []

    def run(self) -> tuple[int | None, int]:
        """Scan from the piece's start (a header); returns where the scan stopped and the bytes still needed there.

        need > 0: the piece ends within the member at stop (its headers are in `headers` when whole,
        so they are checked before their sizes are trusted). need == 0: stop is the end-of-archive
        block, or None at a header this reader leaves to webdataset.
        """
        buf, end, pos = self.buf, len(self.buf), 0
        while True:
            if end - pos < BLOCK:
                return pos, BLOCK - (end - pos)
            header = buf[pos:pos + BLOCK]
            if header == _ZERO_BLOCK:
                return pos, 0
            self.headers.append(pos)
            kind, size = _kind_and_size(header)
            path = None
            member = pos
            if kind == _PAX:  # the extended header of the next member: its path, size, times
                if size is None:
                    return None, 0
                member = pos + BLOCK + -(-size // BLOCK) * BLOCK
                if end - member < BLOCK:
                    return pos, member + BLOCK - end
                fields = _pax_fields(buf[pos + BLOCK:pos + BLOCK + size])
                header = buf[member:member + BLOCK]
                self.headers.append(member)
                if fields is None or header == _ZERO_BLOCK:
                    return None, 0
                path, pax_size = fields
                kind, size = _kind_and_size(header)
                if pax_size is not None and size is not None:
                    size = max(size, pax_size) if kind == _DIRECTORY else pax_size  # a directory needs both 0
            if kind not in (_REGULAR, _OLD_REGULAR, _DIRECTORY) or size is None:
                return None, 0
            name = header[:100].split(b"\0", 1)[0].decode(_NAME_ENCODING, "surrogateescape")
            directory = kind == _DIRECTORY or (kind == _OLD_REGULAR and name.endswith("/"))
            if directory:
                if size:
                    return None, 0  # tarfile would not skip a directory's bytes
                name = name.rstrip("/")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode(_NAME_ENCODING, "surrogateescape") + "/" + name
            if path is not None:
                name = path
            stop = member + BLOCK + -(-size // BLOCK) * BLOCK
            if stop > end:
                return pos, stop - end
            self.entries.append((len(self.headers) - 1, name, member + BLOCK, size, not directory))
            pos = stop


def _kind_and_size(header: bytes) -> tuple[bytes, int | None]:
    """A header's type flag and size (None where the size is not a plain octal number)."""
    if header[124] in (0o200, 0o377):
        return header[156:157], None  # base-256
    try:
        return header[156:157], int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return header[156:157], None


def _pax_fields(records: bytes) -> tuple[str | None, int | None] | None:
    """(path, size) of a pax extended header, either None where absent; None for a header with other
    keywords (or anything `tarfile` might read another way)."""
    lone = _PAX_LONE_IGNORED.fullmatch(records)
    if lone and int(lone.group(1)) == len(records):
        return None, None
    path = size = None
    pos = 0
    while pos < len(records):
        match = _PAX_RECORD.match(records, pos)
        if not match:
            return None
        stop = match.start(1) + int(match.group(1))
        if stop <= match.end() or stop > len(records) or records[stop - 1] != ord("\n"):
            return None
        keyword, value = match.group(2), records[match.end():stop - 1]
        if keyword == b"path":
            try:
                path = value.decode("utf-8").rstrip("/")
            except UnicodeDecodeError:
                return None
        elif keyword == b"size":
            if not value.isdigit():
                return None
            size = int(value)
        elif keyword not in _PAX_IGNORED:
            return None
        pos = stop
    return path, size


def _valid_headers(buf: bytes, offsets: list[int]) -> list[bool]:
    """Whether `tarfile` accepts each header: plain octal number fields and a matching (unsigned) checksum.

    A header `tarfile` would accept some other way (signed checksum, base-256 or space-padded
    numbers) counts as not valid here, so it goes to webdataset: never a different reading.
    """
    if not offsets:
        return []
    # Headers lie at multiples of 512 from the piece's start (a piece starts at a header), so the
    # piece's blocks are a view and the headers rows of it: no (n, 512) index array to build.
    starts = np.asarray(offsets)  # (n,)
    if (starts % BLOCK).any():  # the scan steps by whole blocks; anything else is a bug, not a tar
        raise ValueError(f"tar header offsets must be multiples of {BLOCK}")
    blocks = np.frombuffer(buf, np.uint8, count=len(buf) // BLOCK * BLOCK).reshape(-1, BLOCK)
    blocks = blocks[starts // BLOCK]  # (n, 512)
    fields = blocks[:, _FIELD_COLUMNS]  # (n, c) the number fields' bytes
    nul = fields == 0
    # NULs from the start of each column's field up to the column: 0 before the field's first NUL.
    nuls = np.cumsum(nul, axis=1)
    before_nul = nuls - nuls[:, _FIELD_FIRST] + nul[:, _FIELD_FIRST] == 0  # (n, c)
    octal = (fields >= ord("0")) & (fields <= ord("7"))
    valid = (octal | ~before_nul).all(axis=1)
    # The stored checksum: the octal digits before the field's first NUL.
    digits = np.where(before_nul[:, _CHKSUM_COLUMNS], fields[:, _CHKSUM_COLUMNS].astype(np.int64) - ord("0"), 0)
    places = before_nul[:, _CHKSUM_COLUMNS].sum(axis=1, keepdims=True) - 1 - np.arange(len(_CHKSUM_COLUMNS))
    stored = (digits * np.where(places >= 0, 8 ** np.maximum(places, 0), 0)).sum(axis=1)  # (n,)
    # The checksum field itself counts as eight spaces.
    chksum_bytes = fields[:, _CHKSUM_COLUMNS].sum(axis=1, dtype=np.int64)
    computed = blocks.sum(axis=1, dtype=np.uint32).astype(np.int64) - chksum_bytes + 8 * ord(" ")
    return (valid & (computed == stored)).tolist()
