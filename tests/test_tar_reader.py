"""The offset tar reader gives webdataset's samples, byte for byte, and webdataset's errors on damaged tars."""

from __future__ import annotations

import gzip
import io
import os
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch._utils import ExceptionWrapper

from rankpipe.errors import InputError
from rankpipe.pipeline.data import tar_reader
from rankpipe.pipeline.data.tar_reader import FILE_OFFSETS, tar_samples, webdataset_samples
from rankpipe.pipeline.data.tars import list_tars
from rankpipe.pipeline.embed import decode
from rankpipe.pipeline.embed.decode import TarBatches, TarTask, tar_error_text
from rankpipe.pipeline.embed.job import worker_message

from conftest import encode, tiny_image, write_tiny_shards


def read_both(url: str, readers=(tar_samples, webdataset_samples)) -> list[tuple[list[dict], list[str]]]:
    """(samples, error texts) of the offset reader and of webdataset, values as bytes."""
    results = []
    for read in readers:
        errors: list[str] = []
        samples = [{k: v if k.startswith("__") else bytes(v) for k, v in sample.items()}
                   for sample in read(url, lambda e: errors.append(tar_error_text(e)) or True)]
        for sample in samples:
            check_file_offsets(url, sample)
        results.append((samples, errors))
    return results


def check_file_offsets(url: str, sample: dict) -> None:
    """Each member of a sample read by offset lies in the tar where its FILE_OFFSETS entry says (the
    entry is then removed, as webdataset's samples have none)."""
    offsets = sample.pop(FILE_OFFSETS, None)
    if offsets is None:
        return
    assert offsets.keys() == {k for k in sample if not k.startswith("__")}
    with open(url, "rb") as file:
        for extension, offset in offsets.items():
            file.seek(offset)
            assert file.read(len(sample[extension])) == sample[extension]


def add_member(archive: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type = (len(data) if kind == tarfile.REGTYPE else 0), kind
    # A fractional time, as webdataset's writer sets it: a pax header before every member of a pax tar.
    info.mtime = 1_700_000_000.25
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_odd_tar(path: Path, tar_format: int = tarfile.USTAR_FORMAT) -> None:
    """Member names webdataset groups in its own ways: folders with dots, upper-case and multi-part
    extensions, names without an extension, meta members, a directory entry, a ustar-prefixed long name
    (a pax tar adds names beyond ASCII and beyond ustar's length)."""
    rng = np.random.default_rng(0)
    jpeg = encode(tiny_image(rng, 2))
    long_folder = "deep/" + "f" * 90 + "/" + "g" * 40
    with tarfile.open(path, "w", format=tar_format) as archive:
        add_member(archive, "__meta__/info.txt", b"skipped")
        add_member(archive, "d.1/", b"", tarfile.DIRTYPE)
        add_member(archive, "d.1/a.jpg", jpeg)
        add_member(archive, "d.1/a.json", b'{"labels": {"squares": 2}}')
        add_member(archive, "d.1/a.seg.PNG", b"\x89PNG not really")
        add_member(archive, "README", b"no extension: not part of any sample")
        add_member(archive, "__key__", b"meta")
        add_member(archive, "B.JPG", jpeg[:100])
        add_member(archive, "B.txt", b"")
        add_member(archive, f"{long_folder}/c.jpg", jpeg)
        add_member(archive, "e f.jpeg", b"x" * 1500)
        if tar_format == tarfile.PAX_FORMAT:
            add_member(archive, "ünïcode/ä.JPG", jpeg)
            add_member(archive, "l" * 120 + "/" + "m" * 120 + ".jpg", jpeg)


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "pax"])
@pytest.mark.parametrize("piece_bytes", [tar_reader.READ_BYTES, 1024, 700])
def test_odd_member_names_give_webdatasets_samples(tmp_path, monkeypatch, piece_bytes, tar_format):
    # Small pieces put member headers, bytes and padding across piece borders.
    monkeypatch.setattr(tar_reader, "READ_BYTES", piece_bytes)
    path = tmp_path / "odd.tar"
    write_odd_tar(path, tar_format)
    monkeypatch.setattr(tar_reader, "webdataset_samples", lambda url, handler: pytest.fail("handed over"))
    (ours, our_errors) = read_both(str(path), [tar_samples])[0]
    monkeypatch.undo()
    (theirs, their_errors) = read_both(str(path), [webdataset_samples])[0]
    assert ours == theirs and our_errors == their_errors == []
    keys = ["d.1/a", "B", "deep/" + "f" * 90 + "/" + "g" * 40 + "/c", "e f"]
    if tar_format == tarfile.PAX_FORMAT:
        keys += ["ünïcode/ä", "l" * 120 + "/" + "m" * 120]
    assert [s["__key__"] for s in ours] == keys
    assert sorted(ours[0]) == ["__key__", "__local_path__", "__url__", "jpg", "json", "seg.png"]


def test_a_webdataset_written_tar_is_read_by_offset(tmp_path, monkeypatch):
    # webdataset's writer puts a pax header (a fractional mtime) before every member.
    path = tmp_path / "w.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": bytes([i]) * (700 * i), "json": b"{}"})
    theirs = read_both(str(path), [webdataset_samples])[0]
    monkeypatch.setattr(tar_reader, "webdataset_samples", lambda url, handler: pytest.fail("handed over"))
    samples = list(tar_samples(str(path), lambda e: False))
    assert all(isinstance(s["jpg"], memoryview) for s in samples)
    assert read_both(str(path), [tar_samples])[0] == theirs and len(theirs[0]) == 5


@pytest.mark.parametrize("cut", ["data", "header", "boundary", "padding", "end-blocks"])
def test_a_truncated_tar_gives_webdatasets_samples_and_error(tmp_path, cut):
    path = tmp_path / "cut.tar"
    write_odd_tar(path)
    with tarfile.open(path) as archive:
        member = archive.getmember("e f.jpeg")
    end = {"data": member.offset_data + 700, "header": member.offset + 100, "boundary": member.offset,
           "padding": member.offset_data + member.size + 10, "end-blocks": member.offset_data + 2048}[cut]
    os.truncate(path, end)
    assert read_both(str(path))[0] == read_both(str(path))[1]
    (samples, errors), _ = read_both(str(path))
    assert len(samples) >= 3
    if cut == "data":
        assert errors and all("unexpected end of data" in e for e in errors)


@pytest.mark.parametrize("damage", ["checksum", "size", "mode", "name-encoding"])
def test_a_damaged_header_gives_webdatasets_reading(tmp_path, damage):
    path = tmp_path / "bad.tar"
    write_odd_tar(path)
    with tarfile.open(path) as archive:
        offset = archive.getmember("B.JPG").offset
    data = bytearray(path.read_bytes())
    if damage == "checksum":
        data[offset + 5] ^= 1  # the name changes, the checksum no longer matches
    elif damage == "size":
        data[offset + 124:offset + 136] = b"0000000x200\0"
    else:
        if damage == "mode":
            data[offset + 100:offset + 108] = b"00006x4\0"  # tarfile ends the archive at this header
        else:
            data[offset] = 0xE9  # not UTF-8: kept as a surrogate escape, as tarfile keeps it
        data[offset + 148:offset + 156] = b"%06o\0 " % (sum(data[offset:offset + 148]) + sum(data[offset + 156:offset + 512]) + 256)
    path.write_bytes(bytes(data))
    ours, theirs = read_both(str(path))
    assert ours == theirs and len(ours[0]) >= 1


@pytest.mark.parametrize("kind", ["pax-global", "gnu-long-name", "gzip", "duplicate", "empty", "missing", "not-a-tar"])
def test_tars_left_to_webdataset_read_the_same(tmp_path, kind):
    path = tmp_path / "x.tar"
    if kind == "gnu-long-name":
        write_odd_tar(path, tarfile.GNU_FORMAT)
    elif kind == "pax-global":
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as archive:
            add_member(archive, "a.jpg", b"after a global header")
    elif kind == "gzip":
        write_odd_tar(tmp_path / "plain.tar")
        path.write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    elif kind == "duplicate":
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for name in ("a.jpg", "a.json", "a.jpg", "b.jpg"):
                add_member(archive, name, name.encode())
    elif kind == "empty":
        with tarfile.open(path, "w"):
            pass
    elif kind == "not-a-tar":
        path.write_bytes(b"plain text " * 100)
    ours, theirs = read_both(str(path))
    assert ours == theirs
    if kind in ("missing", "not-a-tar", "duplicate"):
        assert ours[1], "webdataset reports an error here"


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8


def hand_over(url: str):
    """An offset reader that hands every tar to webdataset from its first sample."""
    raise tar_reader._HandOver
    yield


@pytest.mark.parametrize("with_index", [False, True])
def test_tar_batches_hold_webdatasets_bytes(tmp_path, monkeypatch, with_index):
    manifest = write_tiny_shards(tmp_path / "shards", n_tars=2, per_tar=7, with_index=with_index)
    tars = list_tars([str(p) for p in sorted(manifest.parent.glob("*.tar"))])
    tasks = [TarTask(t, tar.url, tar.count) for t, tar in enumerate(tars)]
    ours = list(TarBatches(tasks, ["squares"], 3, preprocess=pixels, jpeg_on_gpu=True))
    monkeypatch.setattr(tar_reader, "_local_samples", hand_over)
    theirs = list(TarBatches(tasks, ["squares"], 3, preprocess=pixels, jpeg_on_gpu=True))
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert (a.tar, a.start, a.keys, a.splits, a.errors, a.last) == (b.tar, b.start, b.keys, b.splits, b.errors, b.last)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert [bytes(j.numpy()) for j in a.jpegs()] == [bytes(j.numpy()) for j in b.jpegs()]
        np.testing.assert_array_equal(a.image_positions, b.image_positions)
        assert (a.images is None) == (b.images is None) and (a.images is None or a.images.equal(b.images))
    assert sum(len(a.image_positions) for a in ours) == 2  # the PNGs, decoded on the CPU
    expected = b"".join(s.get("jpg", b"") for url in tars for s in wds.WebDataset(url.url, shardshuffle=False, nodesplitter=None,
                                                                         workersplitter=None, empty_check=False))
    assert b"".join(bytes(j.numpy()) for a in ours for j in a.jpegs()) == expected


@pytest.mark.parametrize("jpegs_from", ["tar", "shared memory"])
def test_batches_from_a_dataloader_worker_hold_the_same_jpeg_bytes(tmp_path, monkeypatch, jpegs_from):
    # A worker leaves the JPEGs in the tar for the main process to read (or, where other members take
    # more of the range than allowed, writes them into shared memory); the bytes are the same.
    if jpegs_from == "shared memory":
        monkeypatch.setattr(decode._BatchBuilder, "_jpegs_in_tar", lambda self: None)
    manifest = write_tiny_shards(tmp_path / "shards", n_tars=2, per_tar=7, with_index=True)
    tars = list_tars([str(p) for p in sorted(manifest.parent.glob("*.tar"))])
    dataset = TarBatches([TarTask(t, tar.url, tar.count) for t, tar in enumerate(tars)], ["squares"], 3,
                         preprocess=pixels, jpeg_on_gpu=True)
    here = list(dataset)
    assert all(b.jpeg_source is None for b in here)  # in this process the JPEGs are copied
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    there = list(loader)
    assert [b.start for b in there] == [b.start for b in here] and sum(b.num_images for b in there) == 14
    with_jpegs = [b for b in there if len(b.jpeg_positions)]
    assert with_jpegs and all((b.jpeg_source is not None) == (jpegs_from == "tar") for b in with_jpegs)
    assert all(len(b.jpeg_bytes) == 0 for b in with_jpegs if b.jpeg_source is not None)
    for a, b in zip(here, there):
        assert [bytes(j.numpy()) for j in a.jpegs()] == [bytes(j.numpy()) for j in b.jpegs()]
    assert all(b.jpeg_source is None for b in there)  # read once, by the first jpegs()


def test_jpegs_with_large_other_members_between_them_are_copied(monkeypatch):
    monkeypatch.setattr(decode, "JPEG_RANGE_EXTRA_BYTES", 100)
    meta = decode.parse_json(b'{"labels": {"squares": 1}}', ["squares"])

    def batch(second_offset: int) -> decode.DecodedBatch:
        builder = decode._BatchBuilder(TarTask(0, "x.tar", 2), (1, 2, 3), 0, 1)  # as in a worker
        for position, (data, offset) in enumerate([(b"a" * 60, 1000), (b"b" * 40, second_offset)]):
            builder.add_meta(str(position), meta, "")
            builder.add_jpeg(position, data, offset)
        return builder.build()

    # 100 JPEG bytes: up to 100 + 100 other bytes in the range leave them in the tar.
    near = batch(1060 + 200)
    assert near.jpeg_source == decode.JpegSource("x.tar", 1000, (1, 2, 3))
    assert near.jpeg_spans.tolist() == [[0, 60], [260, 300]]
    far = batch(1060 + 201)
    assert far.jpeg_source is None and far.jpeg_spans.tolist() == [[0, 60], [60, 100]]
    assert [bytes(j.numpy()) for j in far.jpegs()] == [b"a" * 60, b"b" * 40]


def batches_from_a_worker(tar: str, count: int, batch_size: int = 3) -> list[decode.DecodedBatch]:
    dataset = TarBatches([TarTask(0, tar, count)], ["squares"], batch_size, preprocess=pixels, jpeg_on_gpu=True)
    return list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1))


@pytest.mark.parametrize("change", ["cut short", "same size, rewritten", "deleted"])
def test_a_tar_changed_before_its_jpegs_are_read_is_a_clear_error(tmp_path, change):
    manifest = write_tiny_shards(tmp_path / "shards", n_tars=1, per_tar=7, with_index=True)
    (tar,) = list_tars([str(p) for p in sorted(manifest.parent.glob("*.tar"))])
    last = [b for b in batches_from_a_worker(tar.url, tar.count) if b.jpeg_source is not None][-1]
    if change == "cut short":
        os.truncate(tar.url, last.jpeg_source.offset + 10)
    elif change == "same size, rewritten":
        data = Path(tar.url).read_bytes()
        Path(tar.url).unlink()
        Path(tar.url).write_bytes(data[::-1])  # another file of the same size under the same name
    else:
        Path(tar.url).unlink()
    with pytest.raises(InputError, match=r"changed while it was being embedded .*--mode overwrite"):
        last.jpegs()


def test_an_error_reading_jpegs_in_the_pinning_thread_reaches_the_user_as_one_sentence():
    # torch re-raises an error of its pinning thread with the thread's traceback in the message.
    try:
        raise InputError("x.tar changed while it was being embedded (gone); put the original tar back")
    except InputError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in pin memory thread for device 0")
    with pytest.raises(InputError) as raised:
        wrapped.reraise()
    assert worker_message(raised.value) == "x.tar changed while it was being embedded (gone); put the original tar back"


def test_a_worker_batch_across_a_hand_over_to_webdataset_holds_copies(tmp_path):
    # A GNU long name in the fourth sample hands the rest of the tar to webdataset (from the third
    # sample, the one being grouped then): batches holding its samples have JPEGs without offsets.
    rng = np.random.default_rng(0)
    path = tmp_path / "x.tar"
    keys = ["s0", "s1", "s2", "s3" + "x" * 120, "s4"]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for key in keys:
            add_member(archive, f"{key}.jpg", encode(tiny_image(rng, 1)))
            add_member(archive, f"{key}.json", b'{"labels": {"squares": 1}}')
    dataset = TarBatches([TarTask(0, str(path), len(keys))], ["squares"], 2, preprocess=pixels, jpeg_on_gpu=True)
    here = list(dataset)
    there = batches_from_a_worker(str(path), len(keys), batch_size=2)
    assert [b.jpeg_source is not None for b in there] == [True, False, False]
    assert [[bytes(j.numpy()) for j in b.jpegs()] for b in there] == [[bytes(j.numpy()) for j in b.jpegs()] for b in here]
    assert sum(len(b.jpeg_positions) for b in there) == len(keys)


def test_a_tar_that_shrinks_while_it_is_read_is_handed_to_webdataset(tmp_path, monkeypatch):
    # The size taken when the tar was opened is larger than what is left to read.
    manifest = write_tiny_shards(tmp_path / "shards", n_tars=1, per_tar=7)
    url = str(next(manifest.parent.glob("*.tar")))
    monkeypatch.setattr(tar_reader, "READ_BYTES", 4096)
    size = os.path.getsize(url)
    os.truncate(url, size // 2)
    real_fstat = os.fstat
    monkeypatch.setattr(tar_reader.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], size, *real_fstat(fd)[7:])))
    # A reader that loops on the short read fails here instead of hanging.
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the reader loops on a tar that shrank"))
    signal.alarm(60)
    try:
        ours, theirs = read_both(url)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert ours == theirs and ours[1]  # webdataset's reading, and its error
