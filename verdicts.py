"""Verdicts from scores and maps, and the predictions CSV that holds them, written as they come.

numpy only (no torch): predict.py and the exported model's runner (predict_exported.py) share these, so the same
scores give the same rows, columns and exit codes.
"""
from __future__ import annotations

import csv
import glob
import dataclasses
import functools
import hashlib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atomic import WriteError, atomic_write_text, check_writable_folder
from config import Interrupted, UserError

COLUMNS = ("path", "score", "normalized_score", "anomalous", "region_fraction", "model", "error")
_BYTES = {"encoding": "utf-8", "errors": "surrogateescape"}  # a file name's bytes are kept exactly
_ENCODING = {**_BYTES, "newline": ""}

try:
    import fcntl
except ImportError:  # Windows: no lock against a second run writing the same partial file
    fcntl = None


@dataclasses.dataclass
class Inspection:
    """Verdicts on a batch of images: anomalous when the image score is above the image threshold; the defect
    region is where the anomaly map is above the pixel threshold. Scores and maps are nearest-neighbour distances."""

    scores: np.ndarray  # (N,) image scores
    maps: np.ndarray  # (N, S, S) anomaly maps
    image_threshold: float
    pixel_threshold: float

    @functools.cached_property
    def normalized_scores(self) -> np.ndarray:
        """Score / image threshold: 1.0 is the threshold, above it anomalous; comparable across categories."""
        return self.scores / self.image_threshold

    @functools.cached_property
    def anomalous(self) -> np.ndarray:
        return self.scores > self.image_threshold

    @property
    def regions(self) -> np.ndarray:
        """(N, S, S) bool: the pixels whose map value is above the pixel threshold."""
        return self.maps > self.pixel_threshold

    @functools.cached_property
    def region_fractions(self) -> np.ndarray:
        """Share of each image's (resized, cropped) area inside the defect region."""
        return self.regions.mean(axis=(1, 2))

    def row(self, i: int, path: Path, model: str) -> dict:
        """Image ``i``'s CSV row."""
        return {"path": str(path), "score": f"{self.scores[i]:.6f}", "normalized_score": f"{self.normalized_scores[i]:.4f}",
                "anomalous": int(self.anomalous[i]), "region_fraction": f"{self.region_fractions[i]:.5f}",
                "model": model, "error": ""}


def error_row(path: Path, error: str, model: str) -> dict:
    """The CSV row of an image that could not be scored: its reason, no verdict."""
    return {"path": str(path), "model": model, "error": error}


class VerdictFile:
    """The predictions CSV, written as verdicts come, so that Ctrl-C, a kill or a full disk costs at most the
    batch in flight.

    Each batch's rows are appended to '<output>.<run>.partial' and flushed to disk; once every image has a row, that
    file, in input order, replaces the output, and only then: the output of an earlier run stays whole until the new
    one is complete. <run> names the model and its thresholds, so a rerun with the same output, model and
    thresholds resumes: the images that already have a verdict are not scored again (those that failed are retried).
    Partial files of this output from another model or threshold are removed when a run starts.
    """

    def __init__(self, output: str | os.PathLike, model: str, thresholds: tuple[float, float]):
        self.output = Path(output)
        run = hashlib.sha256(f"{model}|{thresholds[0]!r}|{thresholds[1]!r}".encode()).hexdigest()[:10]
        self.partial = self.output.with_name(f"{self.output.name}.{run}.partial")
        self.file, self.resumed = None, False

    @staticmethod
    def check(output: str | os.PathLike) -> None:
        """UserError unless ``output`` can be written: not a folder, its folder writable (made if missing). Called
        before any work."""
        output = Path(output)
        if output.is_dir():
            raise UserError(f"--output '{output}' is a folder: name a CSV file, e.g. '{output / 'predictions.csv'}'")
        check_writable_folder(output.parent, "the predictions CSV")

    def open(self) -> dict[str, dict]:
        """Start or resume the partial file; returns the rows already there by path (only scored ones)."""
        for other in self.output.parent.glob(f"{glob.escape(self.output.name)}.*.partial"):
            if other != self.partial:
                print(f"removed '{other}', the partial results of an interrupted run with another model or threshold")
                other.unlink(missing_ok=True)
        done = {}
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if self.partial.exists():
                done = {row["path"]: row for row in _complete_rows(self.partial) if not row["error"]}
            self.file = open(self.partial, "ab", buffering=0)  # unbuffered: nothing left to flush after a failure
            if fcntl is not None:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.file.tell() == 0:
                self._write([], header=True)
        except BlockingIOError:
            raise UserError(f"another run is writing '{self.partial}': wait for it, or choose another --output") from None
        except OSError as err:
            raise WriteError(f"cannot write '{self.partial}' ({err.strerror or err}): choose a writable --output"
                             ) from None
        return done

    def start(self, files: Sequence[Path]) -> tuple[list[Path], str]:
        """Open (or resume) the partial file: the files that still need a verdict, and a note on the resumption."""
        done = self.open()
        todo = [path for path in files if str(path) not in done]
        self.resumed = bool(done)
        note = f"; resuming: {len(files) - len(todo)} already have their verdict in {self.partial}" if done else ""
        return todo, note

    def interrupted(self) -> Interrupted:
        """What Ctrl-C says while verdicts are being written."""
        return Interrupted(f"the verdicts so far are in '{self.partial}': rerun the same command to resume")

    def append(self, rows: Sequence[dict]) -> None:
        """Add ``rows`` to the partial file, on disk when this returns; on failure the file is as before."""
        self._write(rows)

    def _write(self, rows: Sequence[dict], header: bool = False) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, restval="")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        data = memoryview(text.getvalue().encode(**_BYTES))
        size = self.file.tell()
        try:
            while data:
                data = data[self.file.write(data):]
            os.fsync(self.file.fileno())
        except OSError as err:
            self._truncate(size)
            raise WriteError(f"cannot write '{self.partial}' ({err.strerror or err}): free some space or choose "
                             f"another --output, then rerun the same command to resume") from None

    def _truncate(self, size: int) -> None:
        """Cut a half-written batch off (when the disk allows even that)."""
        try:
            self.file.truncate(size)
            self.file.seek(size)
        except OSError:
            pass

    def finish(self, paths: Sequence[Path]) -> list[dict]:
        """Write the output: one row per path of ``paths``, in that order (the latest row of each), and remove the
        partial file; returns the rows."""
        self.file.close()
        latest = {row["path"]: row for row in _complete_rows(self.partial)}
        rows = [latest[str(path)] for path in paths]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.output, text.getvalue())
        self.partial.unlink()
        return rows

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


def report(rows: Sequence[dict], scored_now: int, resumed: bool, seconds: float, output: Path, extra: str = "") -> int:
    """Print the run's one-line summary (and, when some images could not be read, an error line); returns the exit
    code: 1 when some could not be read, else 0."""
    failed = sum(1 for row in rows if row["error"])
    anomalous = sum(1 for row in rows if row["anomalous"] == "1")
    this_run = f" ({scored_now} in this run)" if resumed else ""
    print(f"scored {len(rows) - failed}, anomalous {anomalous}, failed {failed}{this_run} in {seconds:.1f} s "
          f"({scored_now / max(seconds, 1e-9):.1f} images/s) -> {output}{extra}")
    if failed:
        print(f"error: {failed} of {len(rows)} images could not be read: see the error column of {output}",
              file=sys.stderr)
    return 1 if failed else 0


def _complete_rows(path: Path) -> list[dict]:
    """The rows of a partial file, without a last line that a kill cut short (removed from the file too)."""
    with open(path, "r+", **_ENCODING) as f:
        text = f.read()
        end = text.rfind("\n") + 1
        if end < len(text):
            f.seek(0)
            f.truncate(len(text[:end].encode(**_BYTES)))
    rows = list(csv.DictReader(io.StringIO(text[:end])))
    return [row for row in rows if set(row) == set(COLUMNS)]
