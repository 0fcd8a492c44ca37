"""Writing the manifest: rows buffered on the driver and written as parts (``part-<run_id>-<n>.parquet``) under
the output prefix's manifest folder, always with ``manifest.SCHEMA`` so any set of parts reads as one table."""

from __future__ import annotations

import io as _io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import SCHEMA, folder_of, normalize_row


ROWS_AS_DICTS = 1_024  # buffered rows held as Python dicts at most; the rest as Arrow, ~1/7 of the memory


def as_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([normalize_row(r) for r in rows], schema=SCHEMA)


def write_part(output_uri: str, manifest_dir: str, run_id: str, part: int, rows: list[dict] | pa.Table) -> str:
    table = rows if isinstance(rows, pa.Table) else as_table(rows)
    buf = _io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage, folder = folder_of(output_uri, manifest_dir)
    key = f"{folder}/part-{run_id}-{part:05d}.parquet"
    storage.write(key, buf.getvalue())
    return storage.uri_of(key)


def _row_bytes(row: dict) -> int:
    """A manifest row's size as PartWriter counts it: its strings' lengths, 8 bytes for anything else."""
    return sum(len(v) if isinstance(v, str) else 8 for v in row.values())


class PartWriter:
    """Buffers manifest rows on the driver and writes them as parts: at ``rows_per_file`` rows, at
    ``bytes_per_file`` bytes of row text, or once the oldest buffered row is ``flush_s`` old. The age is
    checked on every row and by a timer thread, so a slow tail of the job cannot hold rows back (a driver
    killed then loses at most ``flush_s`` of rows; the rerun redoes those inputs). Thread-safe.

    A part never ends inside an image: the face rows of one image (``num_faces`` of them, which arrive
    together) are held until the last one is in. A part cut between them, followed by a killed driver,
    would leave an image whose latest rows are an ``ok`` with faces missing, which resume would skip."""

    def __init__(self, output_uri: str, manifest_dir: str, run_id: str, rows_per_file: int, bytes_per_file: int,
                 flush_s: float):
        import threading

        self.output_uri, self.manifest_dir, self.run_id = output_uri, manifest_dir, run_id
        self.rows_per_file, self.bytes_per_file, self.flush_s = rows_per_file, bytes_per_file, flush_s
        self.parts: list[str] = []
        self._rows: list[dict] = []  # complete images only
        # Older complete images, converted every ROWS_AS_DICTS rows: a full row held ~7.7 KB as a dict, ~1.1 KB as
        # Arrow (a flush_s of rows at 1,000 GPUs' rate was over 500 MB on the driver as dicts).
        self._tables: list[pa.Table] = []
        self.dropped = 0  # face rows of an incomplete image left out at close
        self._image: list[dict] = []  # the face rows of the image still arriving
        self._bytes = 0
        self._since = 0.0
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="manifest-flush", daemon=True)
        self._timer.start()

    def add(self, row: dict) -> None:
        with self._lock:
            if not self._buffered and not self._image:
                self._since = time.monotonic()
            self._bytes += _row_bytes(row)
            if row.get("face_index") is None:  # an image-level row is a whole image
                self._take([row])
            else:
                if self._image and self._image[0]["input_uri"] != row["input_uri"]:
                    self._image = []  # cannot happen (an image's rows arrive together): never write it partial
                self._image.append(row)
                if len(self._image) >= (row.get("num_faces") or 1):
                    image, self._image = self._image, []
                    self._take(image)
            if self._buffered and (self._buffered >= self.rows_per_file or self._bytes >= self.bytes_per_file
                                   or time.monotonic() - self._since >= self.flush_s):
                self._flush()
            self._raise()  # a failed timer flush: its rows are still buffered, and so is this one

    def close(self) -> None:
        """Stop the timer and write the whole images buffered."""
        self._stop.set()
        self._timer.join()
        with self._lock:
            # An image whose face rows did not all arrive (the job was interrupted) is not written: rows saying
            # "ok" with faces missing would make resume skip it. Its output, if any, has no row: the rerun
            # redoes it (plan.unrecorded).
            self.dropped = len(self._image)
            self._image = []
            self._flush()
            self._raise()

    def _take(self, rows: list[dict]) -> None:
        """Buffer the rows of a complete image (converted first: a row that does not fit the schema changes nothing)."""
        if len(self._rows) + len(rows) >= ROWS_AS_DICTS:
            self._tables.append(as_table(self._rows + rows))
            self._rows = []
        else:
            self._rows.extend(rows)

    @property
    def _buffered(self) -> int:
        """Complete images' rows buffered, as dicts or as Arrow."""
        return len(self._rows) + sum(t.num_rows for t in self._tables)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _flush(self) -> None:
        if self._buffered:
            table = pa.concat_tables(self._tables + ([as_table(self._rows)] if self._rows else []))
            self.parts.append(write_part(self.output_uri, self.manifest_dir, self.run_id, len(self.parts), table))
        self._rows, self._tables = [], []
        self._bytes = sum(_row_bytes(r) for r in self._image)
        if self._image:  # the image still arriving starts the next part's clock
            self._since = time.monotonic()

    def _tick(self) -> None:
        while not self._stop.wait(min(self.flush_s / 4, 5.0)):
            with self._lock:
                if self._buffered and time.monotonic() - self._since >= self.flush_s:  # whole images only
                    try:
                        self._flush()
                    except Exception as exc:  # noqa: BLE001 - surfaces on the next add / close
                        self._error = exc
