"""Records kept as Arrow columns, memory-mapped from disk, instead of a million Python objects.

    from vlmtune.data.table import open_records
    table = open_records("data/train.jsonl", cache_root="runs/x/data_cache")   # a SampleTable
    table[0]                       # a Sample, built when asked for
    table.select([0, 5, 9])        # a view: no record is copied

`vlmtune train` reads its data here (`vlmtune/data/load.py`). A dataset file is parsed once, in
parallel (`data.num_proc` processes, each a byte range of the file), by the same readers as
`load_samples` (`readers.py`), into Arrow files under `CACHE/records/<key>/`; `key` hashes the
file's bytes, the format asked for, the folder image paths resolve against and READER_VERSION. A
rerun or a resume memory-maps those files and parses nothing. Any record the readers refuse sends
the whole file through `load_samples`, which raises the very error it always raised (file, record,
what to do).

`data.train` may also be a folder of Parquet or Arrow shards with the images embedded, as
`vlmtune data prepare --shards N` writes them (`shards.py`): `SCHEMA` below, one row per sample.
Arrow shards are memory-mapped where they are; Parquet shards are converted to Arrow in the cache
once (a Parquet row cannot be read without decoding its whole row group).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vlmtune.data.formats import EXTENSIONS, _check_format, _extension, detect_format, read_dataset
from vlmtune.data.images import EmbeddedImage
from vlmtune.data.readers import read_record
from vlmtune.data.sample import Sample, Turn
from vlmtune.errors import DataError

READER_VERSION = 1  # bump when the same file gives other rows (readers or SCHEMA changed)
IMAGE_TYPE = pa.struct([("path", pa.string()), ("bytes", pa.binary())])  # bytes: null for a file on disk
SCHEMA = pa.schema([
    ("images", pa.list_(IMAGE_TYPE)),
    ("turns", pa.list_(pa.struct([("role", pa.string()), ("text", pa.string())]))),
    ("id", pa.string()),
    ("meta", pa.string()),  # the record's other fields as JSON ("" for none)
])
SHARD_SUFFIXES = (".parquet", ".arrow")
ROWS_PER_BATCH = 2000
JSON_CHUNK_RECORDS = 10_000  # records per parsing task of a .json file
JSONL_CHUNK_BYTES = 1 << 20  # smallest byte range per parsing task of a .jsonl file


def resolve_num_proc(num_proc: int | None) -> int:
    """`data.num_proc`: None (or 0) means every core this process may use, shared among the ranks
    of this machine under torchrun (each rank reads and checks the data too)."""
    if num_proc:
        return max(1, num_proc)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def fork_pool(processes: int, initializer=None):
    """A process pool whose workers inherit this process's memory (a memory-mapped table, an encoder)
    instead of receiving it pickled; None where fork is not available."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork").Pool(processes, initializer=initializer)


def worker_setup() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already: threads inside would only contend
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


# --- Samples <-> Arrow ---------------------------------------------------------------------------

def samples_to_batch(samples: Sequence[Sample]) -> pa.RecordBatch:
    """Samples as one Arrow record batch of `SCHEMA`, built column by column (flat lists and
    offsets: no Python dict per turn or image). Their sources are not stored: a row's source is its
    file and position (see `SampleTable`)."""
    image_offsets, paths, data = [0], [], []
    turn_offsets, roles, texts = [0], [], []
    for s in samples:
        for p in s.images:
            paths.append(str(p))
            data.append(p.data if isinstance(p, EmbeddedImage) else None)
        image_offsets.append(len(paths))
        for t in s.turns:
            roles.append(t.role)
            texts.append(t.text)
        turn_offsets.append(len(roles))
    images = pa.ListArray.from_arrays(pa.array(image_offsets, pa.int32()), pa.StructArray.from_arrays(
        [pa.array(paths, pa.string()), pa.array(data, pa.binary())], fields=list(IMAGE_TYPE)))
    turns = pa.ListArray.from_arrays(pa.array(turn_offsets, pa.int32()), pa.StructArray.from_arrays(
        [pa.array(roles, pa.string()), pa.array(texts, pa.string())], fields=list(SCHEMA.field("turns").type.value_type)))
    ids = [s.id for s in samples]
    meta = [json.dumps(s.meta, ensure_ascii=False, default=str) if s.meta else "" for s in samples]
    return pa.RecordBatch.from_arrays([images.cast(SCHEMA.field("images").type), turns.cast(SCHEMA.field("turns").type),
                                       pa.array(ids, pa.string()), pa.array(meta, pa.string())], schema=SCHEMA)


def row_to_sample(row: dict, source: str) -> Sample:
    images = [EmbeddedImage(im["path"], im["bytes"]) if im["bytes"] is not None else im["path"]
              for im in row["images"]]
    return Sample(images=images, turns=[Turn(t["role"], t["text"]) for t in row["turns"]], id=row["id"],
                  source=source, meta=json.loads(row["meta"]) if row["meta"] else {})


def _flat_lists(column: pa.ChunkedArray) -> tuple[list[int], list[list]]:
    """A list<struct> column as (end offset of each row, one Python list per struct field)."""
    array = column.combine_chunks()
    ends = np.cumsum(pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)).tolist()
    return ends, [field.to_pylist() for field in array.flatten().flatten()]


def _build_samples(part: pa.Table, sources: list[str]) -> list[Sample]:
    """The rows of `part` as Samples, converted a column at a time (faster than a dict per row)."""
    image_ends, (paths, data) = _flat_lists(part.column("images"))
    turn_ends, (roles, texts) = _flat_lists(part.column("turns"))
    ids, metas = part.column("id").to_pylist(), part.column("meta").to_pylist()
    samples, i0, t0 = [], 0, 0
    for k, source in enumerate(sources):
        i1, t1 = image_ends[k], turn_ends[k]
        images = [p if d is None else EmbeddedImage(p, d) for p, d in zip(paths[i0:i1], data[i0:i1])]
        turns = [Turn(r, t) for r, t in zip(roles[t0:t1], texts[t0:t1])]
        samples.append(Sample(images=images, turns=turns, id=ids[k], source=source,
                              meta=json.loads(metas[k]) if metas[k] else {}))
        i0, t0 = i1, t1
    return samples


class SampleTable(Sequence):
    """A read-only sequence of `Sample`s backed by an Arrow table (memory-mapped when it comes from
    files), built one chunk at a time as they are read.

    Args:
        table: rows in `SCHEMA`.
        files: (label, first row) of each file the rows came from, in row order; a sample's source
            is `LABEL:ROW-IN-THAT-FILE`, as `load_samples` names it.
        key: a hash of the rows' content, for caches of results about them (`check_cache.py`).
        rows: the table rows this view holds, in order (None: all of them).
    """

    def __init__(self, table: pa.Table, files: list[tuple[str, int]], key: str, rows: np.ndarray | None = None):
        self.table = table
        self.files = files
        self._starts = [start for _, start in files]
        self.key = key
        self.rows = rows

    def __len__(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} samples from {', '.join(label for label, _ in self.files[:3])})"

    def row_of(self, i: int) -> int:
        return int(self.rows[i]) if self.rows is not None else i

    def source(self, row: int) -> str:
        k = bisect.bisect_right(self._starts, row) - 1
        label, start = self.files[k]
        return f"{label}:{row - start}"

    def chunk(self, start: int, stop: int) -> list[Sample]:
        """Samples `start` to `stop` of this view, built from one Arrow read."""
        start, stop = max(0, start), min(stop, len(self))
        if start >= stop:
            return []
        if self.rows is None:
            rows = range(start, stop)
            part = self.table.slice(start, stop - start)
        else:
            rows = self.rows[start:stop]
            part = self.table.take(pa.array(rows))
        return _build_samples(part, [self.source(int(row)) for row in rows])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return self.chunk(i, i + 1)[0]

    def __iter__(self):
        for start in range(0, len(self), ROWS_PER_BATCH):
            yield from self.chunk(start, start + ROWS_PER_BATCH)

    def select(self, positions) -> SampleTable:
        """The samples at `positions` (of this view), in that order; nothing is copied."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = positions if self.rows is None else self.rows[positions]
        key = hashlib.sha256(self.key.encode() + rows.tobytes()).hexdigest()[:40]
        return SampleTable(self.table, self.files, key, rows)

    def file_images(self) -> list[str]:
        """The distinct image files (not embedded images) the samples name, without building samples."""
        images = self.table.column("images")
        if self.rows is not None:
            images = images.take(pa.array(self.rows))
        flat = pc.list_flatten(images)
        if len(flat) == 0:
            return []
        on_disk = pc.filter(pc.struct_field(flat, "path"), pc.is_null(pc.struct_field(flat, "bytes")))
        return pc.unique(on_disk).to_pylist()

    def image_lists(self) -> list[list[str]]:
        """Every sample's image names (paths), without building the samples."""
        images = self.table.column("images")
        if self.rows is not None:
            images = images.take(pa.array(self.rows))
        return [[im["path"] for im in ims] for ims in images.to_pylist()] if len(self) else []


# --- dataset files -------------------------------------------------------------------------------

def _sha256_file(path: str | Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h


def file_key(path: str, format: str | None) -> str:
    """The cache key of a dataset file's records: its bytes, the format asked for, the folder its
    relative image paths resolve against (records hold absolute paths), and READER_VERSION."""
    h = _sha256_file(path)
    h.update(json.dumps([READER_VERSION, format, os.path.dirname(os.path.abspath(path))]).encode())
    return h.hexdigest()[:40]


def _write_arrow(path: Path, batches) -> int:
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
            n += batch.num_rows
    return n


def read_arrow(path: str | Path) -> pa.Table:
    """An Arrow IPC file (or stream), memory-mapped: its pages are read from disk when touched."""
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


_JOB: dict = {}  # what forked workers inherit: the file text or path, format, folder


def _parse_chunk(task: tuple[int, int, int]) -> tuple[int, int, bool]:
    """Worker: records of one chunk of the file -> one Arrow part file. Returns (part, rows, failed)."""
    part, start, stop = task
    job = _JOB
    try:
        if job["kind"] == "json":  # a range of array elements, commas between them included
            records = json.loads("[" + job["text"][start:stop] + "]")
        else:  # JSON Lines: a range of whole lines
            with open(job["path"], "rb") as f:
                f.seek(start)
                text = f.read(stop - start).decode("utf-8-sig" if start == 0 else "utf-8")
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        samples = [read_record(r, job["format"], job["path"], job["base"]) for r in records]
    except Exception:  # noqa: BLE001 - whatever a bad record makes the readers raise
        return part, 0, True  # the serial reader says exactly what is wrong, with the record's index
    batches = (samples_to_batch(samples[i: i + ROWS_PER_BATCH]) for i in range(0, len(samples), ROWS_PER_BATCH))
    n = _write_arrow(Path(job["folder"]) / f"part-{part:05d}.arrow", batches)
    return part, n, False


def _json_chunks(text: str, target: int) -> list[tuple[int, int]] | None:
    """(start, stop) character ranges of about `target` records each of a JSON array (the commas
    between records included); None when the text is not a plain non-empty array (the serial reader
    handles, or refuses, those). Each record is decoded here to find where it ends, then dropped."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(pos: int) -> int:
        while pos < n and text[pos] in " \t\n\r":
            pos += 1
        return pos

    pos = skip(0)
    if not text.startswith("[", pos):
        return None
    pos = skip(pos + 1)
    if text.startswith("]", pos):
        return None
    chunks, first, count = [], None, 0
    try:
        while True:
            start = pos
            _, pos = decoder.raw_decode(text, pos)
            first = start if first is None else first
            count += 1
            if count % target == 0:
                chunks.append((first, pos))
                first = None
            end, pos = pos, skip(pos)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                break
            else:
                return None
    except json.JSONDecodeError:
        return None
    if first is not None:
        chunks.append((first, end))
    return chunks if not text[pos + 1:].strip() else None


def _jsonl_chunks(path: str, size: int, target_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) byte ranges of whole lines, about `target_bytes` each."""
    chunks, start = [], 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while start < size:
            stop = mm.find(b"\n", min(start + target_bytes, size))
            stop = size if stop < 0 else stop + 1
            chunks.append((start, stop))
            start = stop
    return chunks


def _first_record(path: str, text: str | None, chunks: list[tuple[int, int]]):
    if text is not None:
        return json.JSONDecoder().raw_decode(text, chunks[0][0])[0]
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    return None


def _parse_parallel(path: str, format: str | None, folder: Path, num_proc: int, progress: bool) -> int | None:
    """Parse `path` into part files in `folder`; the number of records, or None when the file needs
    the serial reader (CSV, a malformed or unusual file, a record the readers refuse)."""
    ext = _extension(path)
    if ext == ".csv" or os.path.getsize(path) == 0:
        return None
    kind = "jsonl" if ext == ".jsonl" else "json"
    text = None
    if kind == "json":
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        chunks = _json_chunks(text, JSON_CHUNK_RECORDS)
    else:
        size = os.path.getsize(path)
        chunks = _jsonl_chunks(path, size, max(JSONL_CHUNK_BYTES, size // (num_proc * 8)))
    if not chunks:
        return None
    try:
        first = _first_record(path, text, chunks)
        fmt = format or detect_format(first, f"{path}:0")
    except (ValueError, DataError):
        return None
    _JOB.update(kind=kind, text=text, path=path, format=fmt, base=os.path.dirname(os.path.abspath(path)),
                folder=str(folder))
    tasks = [(k, start, stop) for k, (start, stop) in enumerate(chunks)]
    pool = fork_pool(num_proc, worker_setup) if num_proc > 1 and len(tasks) > 1 else None
    total, failed = 0, False
    try:
        results = pool.imap_unordered(_parse_chunk, tasks) if pool else map(_parse_chunk, tasks)
        with tqdm(total=len(tasks), desc=f"reading {os.path.basename(path)}", unit="part",
                  disable=not progress or len(tasks) < 4) as bar:
            for _, n, bad in results:
                total += n
                failed |= bad
                bar.update()
    finally:
        _JOB.clear()
        if pool is not None:
            pool.terminate()
    return None if failed or total == 0 else total


def open_records(path: str | os.PathLike, format: str | None = None, cache_root: str | Path | None = None,
                 num_proc: int | None = None, progress: bool = True) -> SampleTable:
    """The samples of a dataset file (JSON, JSONL, CSV) or a folder of shards, as a `SampleTable`.

    Args:
        path: a dataset file, or a folder of .parquet / .arrow shards (`vlmtune data prepare --shards`).
        format: one of `formats.FORMATS`; None detects it from the first record.
        cache_root: where the parsed records are kept (CACHE/records/<key>/); None keeps them in memory.
        num_proc: processes that parse (None: every core).

    Raises:
        DataError: as `load_samples`: the file or record (by index) that is wrong, and what to do.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return open_shards(path, cache_root)
    ext = _extension(path)
    _check_format(format, path, ext)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file — check the path")
    key = file_key(path, format)
    files = [(path, 0)]
    folder = Path(cache_root) / "records" / key if cache_root else None
    if folder is not None and (folder / "done.json").is_file():
        return _open_parts(folder, files, key)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=_parent(folder)))
    try:
        n = _parse_parallel(path, format, work, resolve_num_proc(num_proc), progress)
        if n is None:  # the serial reader: raises what load_samples raises, or gives the samples
            for part in work.glob("part-*.arrow"):
                part.unlink()
            samples = read_dataset(path, format)[0]
            _write_arrow(work / "part-00000.arrow", (samples_to_batch(samples[i: i + ROWS_PER_BATCH])
                                                     for i in range(0, len(samples), ROWS_PER_BATCH)))
            del samples
        if folder is None:  # no cache: the rows in memory, still as columns
            return SampleTable(_concat(work, memory=True), files, key)
        (work / "done.json").write_text(json.dumps({"file": os.path.abspath(path), "format": format}) + "\n")
        try:
            os.rename(work, folder)
        except OSError:  # another process (rank) finished the same records first: use those
            if not (folder / "done.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _open_parts(folder, files, key)


def _parent(folder: Path | None) -> str | None:
    if folder is None:
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    return str(folder.parent)


def _concat(folder: Path, memory: bool = False) -> pa.Table:
    parts = sorted(folder.glob("part-*.arrow"))
    tables = [read_arrow(p) for p in parts]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return table.combine_chunks() if memory else table


def _open_parts(folder: Path, files: list[tuple[str, int]], key: str) -> SampleTable:
    return SampleTable(_concat(folder), files, key)


# --- shard folders -------------------------------------------------------------------------------

def shard_files(folder: str) -> list[str]:
    """The .parquet and .arrow files of a shard folder, in name order.

    Raises:
        DataError: the folder holds none.
    """
    files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: a folder given as data holds no .parquet or .arrow shards — give a dataset file "
                        f"({', '.join(EXTENSIONS)}), or write shards with `vlmtune data prepare --shards N`")
    return files


def check_shard_schema(schema: pa.Schema, where: str) -> None:
    """Raises DataError unless `schema` has vlmtune's columns (`SCHEMA`) with their types."""
    for field in SCHEMA:
        if field.name not in schema.names or not schema.field(field.name).type.equals(field.type):
            found = ", ".join(f"{f.name}: {f.type}" for f in schema)
            raise DataError(f"{where}: not a vlmtune shard (needs columns {', '.join(SCHEMA.names)}; found {found}) "
                            "— write shards with `vlmtune data prepare --shards N` (or `vlmtune.data.shards."
                            "write_shards`)")


def open_shards(folder: str, cache_root: str | Path | None = None) -> SampleTable:
    """A shard folder as one `SampleTable`; a sample's source is `SHARD_FILE:ROW`."""
    files = shard_files(folder)
    h = hashlib.sha256(json.dumps([READER_VERSION, "shards"]).encode())
    for f in files:
        h.update(os.path.basename(f).encode())
        _sha256_file(f, h)
    key = h.hexdigest()[:40]
    tables, labels, start = [], [], 0
    for f in files:
        if f.endswith(".arrow"):
            table = read_arrow(f)
        else:
            table = _parquet_as_arrow(f, key, cache_root)
        check_shard_schema(table.schema, f)
        tables.append(table.select(SCHEMA.names).cast(SCHEMA))
        labels.append((f, start))
        start += table.num_rows
    return SampleTable(pa.concat_tables(tables), labels, key)


def _parquet_as_arrow(path: str, key: str, cache_root: str | Path | None) -> pa.Table:
    parquet = pq.ParquetFile(path)
    check_shard_schema(parquet.schema_arrow, path)
    if cache_root is None:
        return parquet.read(columns=SCHEMA.names)
    target = Path(cache_root) / "records" / key / (Path(path).stem + ".arrow")
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            _write_arrow(tmp, (b.select(SCHEMA.names).cast(SCHEMA)
                               for b in parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=SCHEMA.names)))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return read_arrow(target)
