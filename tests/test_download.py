"""download.py without a network: tiny archives served from file:// URLs and from a localhost HTTP server."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

import download
from config import UserError
from dataset import find_samples, list_categories

UNREACHABLE = "http://127.0.0.1:1/"  # port 1: nothing listens, the connection is refused at once


def _image_bytes(pixels: np.ndarray, format_: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format_)
    return buffer.getvalue()


PNG = _image_bytes(np.full((8, 8, 3), 128, np.uint8), "PNG")
JPG = _image_bytes(np.full((8, 8, 3), 128, np.uint8), "JPEG")
MVTEC_MASK = _image_bytes(np.pad(np.full((2, 2), 255, np.uint8), 3), "PNG")
VISA_MASK = _image_bytes(np.pad(np.array([[1, 1, 0], [0, 2, 2]], np.uint8), 2), "PNG")  # regions numbered 1, 2

MVTEC_FILES = {
    "license.txt": b"CC BY-NC-SA 4.0",
    "widget/train/good/000.png": PNG,
    "widget/train/good/001.png": PNG,
    "widget/test/good/000.png": PNG,
    "widget/test/crack/000.png": PNG,
    "widget/ground_truth/crack/000_mask.png": MVTEC_MASK,
}


def _visa_files() -> dict[str, bytes]:
    """Two categories in VisA's layout: two train and one test normal image, one anomaly with its mask."""
    files, rows = {}, ["object,split,label,image,mask"]
    for category in ("candle", "pcb1"):
        for index, split in enumerate(("train", "train", "test")):
            image = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            files[image] = JPG
            rows.append(f"{category},{split},normal,{image},")
        image, mask = f"{category}/Data/Images/Anomaly/000.JPG", f"{category}/Data/Masks/Anomaly/000.png"
        files.update({image: JPG, mask: VISA_MASK, f"{category}/image_anno.csv": b"image,label,mask\n"})
        rows.append(f"{category},test,anomaly,{image},{mask}")
    files[download.VISA_SPLIT_FILE] = "\n".join(rows).encode()
    return files


def _tar(path: Path, files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    """An archive of ``files``, then the ``extra`` members; compressed as the name says (.tar.xz or .tar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:xz" if path.name.endswith(".xz") else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def _source(dataset: str, archive: Path, url: str | None = None) -> download.Source:
    """SOURCES[dataset] with ``url`` (default: the archive's file:// URL) and the archive's digest."""
    return dataclasses.replace(download.SOURCES[dataset], url=url or archive.as_uri(),
                               sha256=hashlib.sha256(archive.read_bytes()).hexdigest())


class _Server(ThreadingHTTPServer):
    """Serves ``files`` by URL path, answers 'Range: bytes=N-', and hangs up after ``cut_at`` body bytes if set."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_at: int | None = None
        self.ranges: list[str | None] = []  # the Range header of each request

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        body, requested = self.server.files[self.path], self.headers.get("Range")
        self.server.ranges.append(requested)
        start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1)) if requested else 0
        if start and start >= len(body):
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:][:self.server.cut_at])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    """A localhost HTTP server on a free port, shut down after the test."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "TIMEOUT_S", 5)


@pytest.fixture
def mvtec_archive(tmp_path: Path) -> Path:
    return _tar(tmp_path / "served" / "mvtec_anomaly_detection.tar.xz", MVTEC_FILES)


def _assert_nothing_trusted(data: Path, source: download.Source) -> None:
    """No data folder, no hidden unpacking folder, no archive under its final name."""
    assert not (data / "mvtec_ad").exists()
    assert not (data / ".mvtec_ad.partial").exists()
    assert not (data / source.filename).exists()


def _assert_mvtec_layout(root: Path) -> None:
    assert len(find_samples(root, "widget", "train")) == 2
    defective = [s for s in find_samples(root, "widget", "test") if s.label]
    assert [(s.defect_type, s.mask_path.name) for s in defective] == [("crack", "000_mask.png")]


def test_mvtec_archive_from_a_file_url_installs_once(tmp_path: Path, mvtec_archive: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    source = _source("mvtec_ad", mvtec_archive)
    root = download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", source)
    assert root == data / "mvtec_ad"
    _assert_mvtec_layout(root)
    assert sorted(p.name for p in data.iterdir()) == ["mvtec_ad"]  # archive removed, nothing half-done
    assert "CC BY-NC-SA 4.0" in capsys.readouterr().out

    again = download.ensure_dataset(root, "mvtec_ad", dataclasses.replace(source, url=UNREACHABLE + "x.tar.xz"))
    assert again == root and "downloading" not in capsys.readouterr().out


def test_visa_over_http_becomes_the_mvtec_layout(tmp_path: Path, server: _Server,
                                                 capsys: pytest.CaptureFixture) -> None:
    archive = _tar(tmp_path / "served" / "VisA_20220922.tar", _visa_files())
    server.files["/VisA_20220922.tar"] = archive.read_bytes()
    data = tmp_path / "data"
    root = download.ensure_dataset(data / "visa", "visa", _source("visa", archive, server.url("/VisA_20220922.tar")))

    assert list_categories(root) == ["candle", "pcb1"]
    assert sorted(p.name for p in data.iterdir()) == ["visa"]
    for category in ("candle", "pcb1"):
        assert [s.path.name for s in find_samples(root, category, "train")] == ["0000.JPG", "0001.JPG"]
        test = find_samples(root, category, "test")
        assert [(s.defect_type, s.path.name) for s in test] == [("bad", "000.JPG"), ("good", "0002.JPG")]
        mask = np.asarray(Image.open(test[0].mask_path))
        assert test[0].mask_path.name == "000_mask.png" and set(np.unique(mask)) == {0, 255}
        assert (mask > 0).sum() == 4
    assert "CC BY 4.0" in capsys.readouterr().out


def test_wrong_checksum_leaves_nothing_trusted(tmp_path: Path, mvtec_archive: Path) -> None:
    data = tmp_path / "data"
    source = dataclasses.replace(_source("mvtec_ad", mvtec_archive), sha256="0" * 64)
    with pytest.raises(UserError, match="SHA-256") as error:
        download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", source)
    assert "\n" not in str(error.value) and mvtec_archive.as_uri() in str(error.value)
    assert list(data.iterdir()) == []  # not even the .part: a wrong file cannot be resumed


def test_broken_off_download_resumes_with_a_range_request(tmp_path: Path, mvtec_archive: Path,
                                                          server: _Server) -> None:
    body = mvtec_archive.read_bytes()
    server.files["/a.tar.xz"], server.cut_at = body, len(body) // 2
    data = tmp_path / "data"
    source = _source("mvtec_ad", mvtec_archive, server.url("/a.tar.xz"))
    with pytest.raises(UserError, match="run again to resume"):
        download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", source)
    _assert_nothing_trusted(data, source)
    assert (data / "a.tar.xz.part").stat().st_size == len(body) // 2

    server.cut_at = None
    _assert_mvtec_layout(download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", source))
    assert server.ranges == [None, f"bytes={len(body) // 2}-"]


def test_complete_part_file_is_verified_not_fetched_again(tmp_path: Path, mvtec_archive: Path,
                                                          server: _Server) -> None:
    body = mvtec_archive.read_bytes()
    server.files["/a.tar.xz"] = body
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.tar.xz.part").write_bytes(body)  # a run killed between the last byte and the rename
    root = download.ensure_dataset(data / "mvtec_ad", "mvtec_ad",
                                   _source("mvtec_ad", mvtec_archive, server.url("/a.tar.xz")))
    _assert_mvtec_layout(root)
    assert server.ranges == [f"bytes={len(body)}-"]  # answered 416: nothing more to fetch


def test_interrupted_unpacking_keeps_only_the_verified_archive(tmp_path: Path, mvtec_archive: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    extract = tarfile.TarFile.extract

    def extract_then_interrupt(tar: tarfile.TarFile, member: tarfile.TarInfo, *args, **kwargs) -> None:
        if member.name.startswith("widget/test"):
            raise KeyboardInterrupt
        extract(tar, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_then_interrupt)
    data = tmp_path / "data"
    source = _source("mvtec_ad", mvtec_archive)
    with pytest.raises(KeyboardInterrupt):
        download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", source)
    assert sorted(p.name for p in data.iterdir()) == [source.filename]  # verified, so kept: no second download

    monkeypatch.undo()
    offline = dataclasses.replace(source, url=UNREACHABLE + source.filename)
    _assert_mvtec_layout(download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", offline))


def _link(kind: bytes, name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)  # empty regular file


# Each unsafe member comes after the good ones, so something was unpacked before it is met.
UNSAFE_MEMBERS: dict[str, Callable[[Path], tarfile.TarInfo]] = {
    "dot-dot path": lambda outside: _file("../../../outside/escaped.txt"),
    "absolute path": lambda outside: _file(str(outside / "absolute.txt")),
    "symlink out": lambda outside: _link(tarfile.SYMTYPE, "widget/link", str(outside)),
    "hardlink out": lambda outside: _link(tarfile.LNKTYPE, "widget/hard.txt", "../../../outside/secret.txt"),
    "device": lambda outside: _device("widget/null"),
}


@pytest.mark.parametrize("case", UNSAFE_MEMBERS)
def test_unsafe_member_is_refused(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    member = UNSAFE_MEMBERS[case](outside)
    archive = _tar(tmp_path / "served" / "mvtec_anomaly_detection.tar.xz", MVTEC_FILES, (member,))
    data = tmp_path / "data"
    source = _source("mvtec_ad", archive)
    with pytest.raises(UserError, match="unsafe member") as error:
        download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", source)
    assert f"'{member.name}'" in str(error.value)
    assert list(data.iterdir()) == []  # archive removed, unpacked members too
    assert [(p.name, p.read_text()) for p in outside.iterdir()] == [("secret.txt", "secret")]


@pytest.mark.parametrize("content", [b"not an archive" * 100, "no category folders"])
def test_bad_archive_is_refused_and_removed(tmp_path: Path, content: bytes | str) -> None:
    archive = tmp_path / "served" / "mvtec_anomaly_detection.tar.xz"
    if isinstance(content, bytes):
        archive.parent.mkdir()
        archive.write_bytes(content)
    else:
        _tar(archive, {"readme.txt": b"hello"})
    data = tmp_path / "data"
    with pytest.raises(UserError, match="removed it and installed nothing") as error:
        download.ensure_dataset(data / "mvtec_ad", "mvtec_ad", _source("mvtec_ad", archive))
    assert "\n" not in str(error.value)
    assert list(data.iterdir()) == []


def test_unreachable_url_is_one_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    source = dataclasses.replace(download.SOURCES["visa"], url=UNREACHABLE + "VisA_20220922.tar")
    with pytest.raises(UserError, match=re.escape(f"cannot download {source.url} (")) as error:
        download.ensure_dataset(data / "visa", "visa", source)
    assert "\n" not in str(error.value) and "network" in str(error.value)
    assert list(data.iterdir()) == []


def test_unknown_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown data set 'mvtec2': choose one of mvtec_ad, visa"):
        download.ensure_dataset(tmp_path / "data", "mvtec2")


def test_train_downloads_the_data_set_first(tmp_path: Path, mvtec_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py --download: the data set arrives, then its categories train as usual."""
    from conftest import SMALL, run_in_process  # noqa: PLC0415  (the suite's CLI helpers)

    monkeypatch.setitem(download.SOURCES, "mvtec_ad", _source("mvtec_ad", mvtec_archive))
    data = tmp_path / "data" / "mvtec_ad"
    result = run_in_process("train.py", "--data_path", data, "--download", "mvtec_ad", *SMALL,
                            "--checkpoint_dir", tmp_path / "checkpoints", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "MVTec AD is ready" in result.stdout and "trained 1, skipped 0" in result.stdout
    assert (tmp_path / "checkpoints" / "widget.pt").is_file()


def test_train_download_offline_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import SMALL, run_in_process  # noqa: PLC0415

    monkeypatch.setitem(download.SOURCES, "visa", dataclasses.replace(download.SOURCES["visa"],
                                                                     url=UNREACHABLE + "VisA_20220922.tar"))
    result = run_in_process("train.py", "--data_path", tmp_path / "visa", "--download", "visa", *SMALL, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot download" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "visa").exists()
