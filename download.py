"""MVTec AD or VisA on demand: download, verify, unpack safely and (VisA) convert once to the MVTec layout.

Nothing half-done is ever taken for data: the download grows in '<archive>.part' (resumed with an HTTP Range
request), gets the archive's name only once its SHA-256 matches, and is unpacked into a hidden folder beside the
data path that is renamed to the data path when complete. An interruption leaves at most that '.part' file or
the verified archive, which the next run resumes from.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from config import UserError
from dataset import GOOD, list_categories

TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError, HTTPError, timeouts and resets are OSErrors


@dataclass(frozen=True)
class Source:
    """Where a data set's archive is, the SHA-256 it must have, and the licence it comes under."""

    name: str
    url: str
    sha256: str
    licence: str

    @property
    def filename(self) -> str:
        return PurePosixPath(urllib.parse.urlparse(self.url).path).name


# URLs and SHA-256 digests: openvinotoolkit/anomalib's DownloadInfo (url, hashsum) in
# src/anomalib/data/datamodules/image/mvtecad.py and src/anomalib/data/datamodules/image/visa.py; anomalib checks
# hashsum with SHA-256 (src/anomalib/data/utils/download.py). VisA's URL is also the one in
# amazon-science/spot-diff's README.md. Licences: anomalib's mvtecad.py (MVTec AD); spot-diff's README.md for VisA
# (anomalib's visa.py says CC BY-NC-SA 4.0 instead; the data set's own repository is taken as the authority).
SOURCES = {
    "mvtec_ad": Source(
        name="MVTec AD",
        url="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
            "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        licence="CC BY-NC-SA 4.0, non-commercial use only (https://www.mvtec.com/company/research/datasets/mvtec-ad)",
    ),
    "visa": Source(
        name="VisA",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        licence="CC BY 4.0 (https://github.com/amazon-science/spot-diff)",
    ),
}
VISA_SPLIT_FILE = "split_csv/1cls.csv"
VISA_DEFECT = "bad"  # 1cls.csv says only normal or anomaly; spot-diff's own MVTec-style layout calls it 'bad'
VISA_TYPES = {"normal": GOOD, "anomaly": VISA_DEFECT}
VISA_SPLITS = ("train", "test")


class _BadArchive(Exception):
    """The verified archive cannot be installed: damaged, unsafe, or not laid out as expected."""


def ensure_dataset(data_path: str | Path, dataset: str, source: Source | None = None) -> Path:
    """The MVTec-layout root at ``data_path``; downloads and unpacks ``dataset`` there first when it is missing.

    ``dataset`` is a key of SOURCES ('mvtec_ad', or 'visa', converted once to the MVTec layout). ``source``
    replaces the URL and digest of SOURCES[dataset] (a mirror; the tests). A non-empty folder at ``data_path``
    is returned as it is: only a complete data set is ever renamed to that path.
    """
    if dataset not in SOURCES:
        raise UserError(f"unknown data set '{dataset}': choose one of {', '.join(SOURCES)}")
    root = Path(data_path)
    if root.is_dir():
        if any(root.iterdir()):
            return root
        root.rmdir()  # an empty folder is replaced by the data set
    source = source or SOURCES[dataset]
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = root.parent / source.filename
    _obtain(source, archive)
    categories = _install(source, archive, root, convert_visa=dataset == "visa")
    archive.unlink()
    print(f"{source.name} is ready in '{root}': {len(categories)} categories ({', '.join(categories)}); "
          f"removed the archive")
    return root


def _obtain(source: Source, archive: Path) -> None:
    """Leave the verified archive at ``archive``: the one already there, or a new or resumed download."""
    candidate = archive
    if not archive.is_file():
        print(f"downloading {source.name} to '{archive}'; it is released under {source.licence}")
        candidate = archive.with_name(archive.name + ".part")
        _download(source.url, candidate)
    _verify(candidate, source)
    os.replace(candidate, archive)


def _download(url: str, part: Path) -> None:
    """Fetch ``url`` into ``part``, continuing what an earlier run fetched when the server takes a Range."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except NETWORK_ERRORS as err:
        code = getattr(err, "code", None)  # an HTTPError's status
        if code == 416:  # nothing beyond what the .part holds: it is complete
            return
        reason = f"HTTP {code} {err.reason}" if code else getattr(err, "reason", err)
        raise UserError(f"cannot download {url} ({reason}): check the network connection and run again") from None
    with response:
        resumed = response.status == 206  # otherwise (200, file://) the whole file comes again
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        with part.open("ab" if resumed else "wb") as file, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name) as bar:
            whole = _copy(response, file, bar) and (total is None or file.tell() >= total)
    if not whole:
        raise UserError(f"the download of {url} broke off after {part.stat().st_size:,} bytes: run again to resume it")


def _copy(response: BinaryIO, file: BinaryIO, bar: tqdm) -> bool:
    """Copy the response body to ``file``; False when the connection broke off."""
    try:
        while chunk := response.read(CHUNK_BYTES):
            file.write(chunk)
            bar.update(len(chunk))
    except NETWORK_ERRORS:
        return False
    return True


def _verify(path: Path, source: Source) -> None:
    """Remove ``path`` and stop unless it has the published SHA-256."""
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if digest != source.sha256:
        path.unlink()
        raise UserError(f"'{path}' from {source.url} has SHA-256 {digest}, not the published {source.sha256}: "
                        "removed it; run again, and if it persists the file at that URL has changed")


def _install(source: Source, archive: Path, root: Path, convert_visa: bool) -> list[str]:
    """Unpack (and for VisA convert) ``archive`` in a hidden folder beside ``root``, then rename it to ``root``.

    Returns the categories. A bad archive is removed; an interruption keeps it, as it is verified."""
    work = root.parent / f".{root.name}.partial"
    shutil.rmtree(work, ignore_errors=True)  # left by a run that was killed
    try:
        ready = _extract(archive, work / "archive")
        if convert_visa:
            ready = _visa_to_mvtec(ready, work / "converted")
        try:
            categories = list_categories(ready)
        except UserError:
            raise _BadArchive(f"has no category folder with train/{GOOD}") from None
        os.replace(ready, root)
    except _BadArchive as err:
        archive.unlink()
        raise UserError(f"'{archive}' {err}: removed it and installed nothing; if this persists, "
                        f"the file at {source.url} has changed") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return categories


def _extract(archive: Path, folder: Path) -> Path:
    """Unpack ``archive`` into ``folder``, refusing any member that could write outside it."""
    try:
        with tarfile.open(archive) as tar:
            for member in tqdm(tar, desc=f"unpacking {archive.name}", unit=" files"):
                _check_member(member)
                tar.extract(member, folder, filter="data")  # tarfile's own guard, on top of _check_member
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as err:
        raise _BadArchive(f"cannot be unpacked ({err})") from None
    return folder


def _check_member(member: tarfile.TarInfo) -> None:
    """Refuse absolute or '..' names, links and device or other special files: image data needs none of them."""
    _safe_relative(member.name)
    if not (member.isfile() or member.isdir()):
        raise _BadArchive(f"has an unsafe member '{member.name}' (a link or special file)")


def _safe_relative(name: str) -> PurePosixPath:
    """``name`` as a relative path that cannot leave the folder it is taken in."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise _BadArchive(f"has an unsafe member '{name}' (absolute or '..' path)")
    return path


def _visa_to_mvtec(visa: Path, out: Path) -> Path:
    """VisA's 1-class split as <category>/train/good, test/good, test/bad and ground_truth/bad/<image>_mask.png."""
    split_file = visa / VISA_SPLIT_FILE
    if not split_file.is_file():
        raise _BadArchive(f"has no {VISA_SPLIT_FILE}")
    with split_file.open(newline="", encoding="utf-8-sig") as file:
        rows = list(csv.DictReader(file))
    for row in tqdm(rows, desc="arranging VisA in the MVTec layout", unit=" images"):
        _place(row, visa, out)
    return out


def _place(row: dict[str, str], visa: Path, out: Path) -> None:
    """Move one image of 1cls.csv to its MVTec-layout folder, and write the mask of a defective one.

    A move, not a copy: both folders are in the same hidden folder, so it never crosses file systems."""
    defect_type = VISA_TYPES.get(row["label"])
    if row["split"] not in VISA_SPLITS or defect_type is None:
        raise _BadArchive(f"has an unexpected row in {VISA_SPLIT_FILE}: {row}")
    image = visa / _safe_relative(row["image"])
    category = out / _safe_relative(row["object"])
    destination = category / row["split"] / defect_type / image.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(image, destination)
        if defect_type != GOOD:
            _write_binary_mask(visa / _safe_relative(row["mask"]),
                               category / "ground_truth" / defect_type / f"{image.stem}_mask.png")
    except (FileNotFoundError, UnidentifiedImageError) as err:
        raise _BadArchive(f"lacks or cannot read a file that {VISA_SPLIT_FILE} names ({err})") from None


def _write_binary_mask(source: Path, destination: Path) -> None:
    """Save VisA's mask (regions numbered 1..N, maybe as palette indices) as 0/255, as spot-diff's conversion does."""
    with Image.open(source) as mask:
        defect = np.asarray(mask) > 0
    if defect.ndim == 3:
        defect = defect.any(axis=-1)
    destination.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(defect, 255, 0).astype(np.uint8), "L").save(destination)
