"""The HTML report: page, plots and contact sheets on disk, thumbnails found by key, and a real browser."""

from __future__ import annotations

import html.parser
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rankpipe.adapter.evaluation.contact_sheet import (
    SheetConfig,
    contact_sheet,
    read_thumbnails,
)
from rankpipe.adapter.evaluation.query_rankings import QueryRanking
from rankpipe.adapter.evaluation.report import ReportConfig, ReportSection, write_report

CHROMIUM = "/usr/bin/chromium"


class _ImgSources(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _colour(i: int) -> tuple[int, int, int]:
    return (40 * i % 256, 255 - 30 * i % 256, 90)


def _write_tar(path: Path, keys: list[str], start: int, ext: str) -> None:
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys, start):
            buf = io.BytesIO()
            Image.new("RGB", (64 + 8 * i, 48), _colour(i)).save(buf, format="PNG" if ext == "png" else "JPEG")
            for name, data in ((f"{key}.{ext}", buf.getvalue()), (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def tars(tmp_path: Path) -> tuple[list[str], list[str]]:
    keys = [f"shard/{i:04d}" for i in range(12)]
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    _write_tar(Path(urls[0]), keys[:6], 0, "png")
    _write_tar(Path(urls[1]), keys[6:], 6, "jpg")
    return urls, keys


def _sections(keys: list[str], with_missing_label: bool) -> list[ReportSection]:
    rng = np.random.default_rng(0)
    labels = np.arange(len(keys), dtype=float)
    if with_missing_label:
        labels[3] = np.nan
    splits = np.array(["test"] * len(keys))
    count = QueryRanking("Sort images by the number of cats.", np.array(keys), labels + rng.normal(size=len(keys)), labels, splits)
    quality = QueryRanking("Sort by quality / sharpness.", np.array(keys[:5]), rng.normal(size=5), np.full(5, np.nan), splits[:5])
    return [
        ReportSection("count", count, summary="PLCC 0.9", notes=("1 sample without label",)),
        ReportSection("quality/sharp", quality, notes=("all labels missing",)),
    ]


def test_thumbnails_are_found_by_key_across_tars(tars: tuple[list[str], list[str]]) -> None:
    urls, keys = tars
    wanted = [keys[1], keys[7], "shard/missing"]
    thumbs = read_thumbnails(urls, wanted, max_px=32)
    assert set(thumbs) == {keys[1], keys[7]}
    assert max(thumbs[keys[7]].size) == 32
    # The right image for the key: its colour identifies it.
    assert np.allclose(thumbs[keys[1]].getpixel((5, 5)), _colour(1), atol=3)
    assert np.allclose(thumbs[keys[7]].getpixel((5, 5)), _colour(7), atol=12)  # JPEG


def test_contact_sheet_layout_and_placeholder() -> None:
    config = SheetConfig(thumb_px=20, columns=3, font_px=8, caption_lines=2, padding=2)
    images = [Image.new("RGB", (20, 10), "red"), None, Image.new("RGB", (10, 20), "blue"), None]
    sheet = contact_sheet(images, [["a", "b"]] * 4, config)
    cell_h = 20 + 2 * (8 + 3)
    assert sheet.size == (2 + 3 * 22, 2 + 2 * (cell_h + 2))
    assert sheet.getpixel((2 + 10, 2 + 10)) == (255, 0, 0)
    assert sheet.getpixel((2 + 22 + 19, 2 + 19)) == (200, 200, 200)  # placeholder corner
    with pytest.raises(ValueError):
        contact_sheet(images, [["a"]], config)


@pytest.mark.parametrize("top_k", [3, 50])
@pytest.mark.parametrize("with_missing_label", [False, True])
def test_report_page_links_existing_decodable_pngs(tmp_path: Path, tars, top_k: int, with_missing_label: bool) -> None:
    urls, keys = tars
    config = ReportConfig(top_k=top_k, sheet=SheetConfig(thumb_px=48, columns=4))
    index = write_report(
        tmp_path / "report", "Evaluation <test>", ["label", "query", "PLCC"], [["count", "cats", "0.9"]],
        _sections(keys, with_missing_label), urls, config, details=[("split", "test")],
    )
    page = index.read_text()
    assert "Evaluation &lt;test&gt;" in page and "<td>0.9</td>" in page
    parser = _ImgSources()
    parser.feed(page)
    assert len(parser.sources) == 2 * 3
    for src in parser.sources:
        assert "/" not in src, "links must be relative names inside the report folder"
        with Image.open(index.parent / src) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 10
    top = Image.open(index.parent / "00-count-top.png").convert("RGB")
    # The highest-scoring image of the count query is in the top-left cell of its top sheet.
    ranking = _sections(keys, with_missing_label)[0].ranking
    best = int(ranking.order()[0])
    cell = np.asarray(top)[8 : 8 + 48, 8 : 8 + 48].reshape(-1, 3)
    assert np.any(np.all(np.abs(cell.astype(int) - _colour(best)) <= 12, axis=1))


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_report_renders_in_a_real_browser(tmp_path: Path, tars) -> None:
    urls, keys = tars
    index = write_report(tmp_path / "report", "Browser check", ["label"], [["count"]], _sections(keys, True), urls)
    shot = tmp_path / "shot.png"
    result = _chromium(["--screenshot=" + str(shot), "--window-size=1200,1600", index.as_uri()], tmp_path)
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5, "the screenshot is blank"

    # A copy of the page with a script that marks whether every image decoded; the DOM dump shows the marker.
    probe = index.parent / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.body.dataset.loaded = imgs.length + ':' + imgs.every(i => i.complete && i.naturalWidth > 0); });</script>"
    )
    probe.write_text(index.read_text().replace("</body>", script + "</body>"))
    dom = _chromium(["--dump-dom", "--virtual-time-budget=5000", probe.as_uri()], tmp_path)
    assert 'data-loaded="6:true"' in dom.stdout, dom.stdout[:500] + dom.stderr[-1000:]
    shutil.rmtree(tmp_path / "chrome-profile", ignore_errors=True)
