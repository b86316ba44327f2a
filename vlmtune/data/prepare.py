"""`vlmtune data prepare`: a hub dataset (or a local copy of it) to training files in one command.

    vlmtune data prepare --recipe latex-ocr --out data/latex_ocr --limit 1000
    vlmtune data prepare --recipe coco-caption --out data/coco --limit 500
    vlmtune data prepare --recipe latex-ocr --local LaTeX_OCR/train.parquet --out data/latex_ocr
    vlmtune data prepare --dataset ID --image-column image --text-column text --out DIR

This is the tutorials' data2csv.py + csv2json.py: read the split's records in order (the first
--limit samples), save every image once under OUT/images/, write OUT/train.json and OUT/val.json
(--val images drawn with --seed by `vlmtune.data.split`, the rule `vlmtune data split` uses, so the
captions of one image are all in train or all in val) in the chosen format, and record the
arguments in OUT/prepare.json. Every caption of an image becomes a training sample, whether the
dataset has a row per caption (COCO 2014 captions) or a list of captions per row. Running the same command again does
nothing; other arguments into a non-empty OUT are refused.

Images are content-addressed: OUT/images/<16 hex digits of sha256(bytes)>.<ext>. The dataset's
own encoded bytes are written unchanged (no re-encoding, no quality loss), and an image shared
by several records (COCO has about five captions per image) is a single file.

Everything is built in a temporary folder beside OUT and renamed into place at the end, so a bad
record, a lost connection or Ctrl-C leaves nothing behind. Where the records come from (the
recipes, the hubs, local files) is `recipes.py`; this module turns records into files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from PIL import Image
from tqdm import tqdm

from vlmtune.data.formats import write_samples
from vlmtune.data.readers import is_url
from vlmtune.data.recipes import PrepareArgs, open_source, records, resolve_args
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.data.shards import write_shards
from vlmtune.data.split import split_samples
from vlmtune.errors import DataError, VlmtuneError
from vlmtune.fileio import removed_on_failure

PREPARE_VERSION = 2  # bump when the output for the same arguments changes, so old folders are not reused
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


# --- records to samples ------------------------------------------------------------------------

def _image_bytes(value, where: str, column: str, base: str) -> bytes:
    """The encoded bytes of one image value: a {"bytes", "path"} dict, bytes, a path, or a PIL image."""
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value.strip():
        if is_url(value):
            raise DataError(f"{where}: column {column!r} holds a URL ({value}); download the images and give paths")
        path = os.path.join(base, os.path.expanduser(value.strip()))
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{where}: cannot read the image file {path} named in column {column!r} "
                            f"({type(e).__name__}: {e.strerror or e})") from None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        try:
            if value.format == "JPEG":  # same quantisation tables as the source: no second loss
                value.save(buffer, "JPEG", quality="keep")
            else:
                value.save(buffer, "PNG")
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: the image in column {column!r} cannot be encoded ({type(e).__name__}: {e})") from None
        return buffer.getvalue()
    raise DataError(f"{where}: column {column!r} holds no image ({type(value).__name__}: {str(value)[:60]!r}) — "
                    "name the image column with --image-column")


def store_image(data: bytes, where: str, column: str, folder: Path) -> str:
    """Check that `data` decodes, write it once as folder/<sha256 prefix>.<ext>, return the path."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # the whole image: a truncated file fails here, not in the middle of training
            if im.format not in SUFFIXES:  # a format readers do not take by extension: store it as PNG
                buffer = io.BytesIO()
                im.save(buffer, "PNG")
                data = buffer.getvalue()
            suffix = SUFFIXES.get(im.format, ".png")
    except Exception as e:
        raise DataError(f"{where}: the image in column {column!r} cannot be decoded ({type(e).__name__}: {e}) — "
                        "fix or remove this record") from None
    path = folder / (hashlib.sha256(data).hexdigest()[:16] + suffix)
    if not path.exists():
        path.write_bytes(data)
    return str(path)


def _answers(value, where: str, column: str) -> list[str]:
    """The answer texts of one record: its text, or each text of a list (COCO copies that hold all
    captions of an image in one record)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: column {column!r} is an empty list — every record needs an answer text")
        return [_answer(v, f"{where} (text {k + 1})", column) for k, v in enumerate(value)]
    return [_answer(value, where, column)]


def _answer(value, where: str, column: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds a {type(value).__name__}, not text — "
                        "name the answer column with --text-column")
    if value is None or not value.strip():
        raise DataError(f"{where}: column {column!r} is empty — every record needs an answer text; fix or remove it")
    return value


def record_samples(row: dict, where: str, args: PrepareArgs, base: str, images: Path) -> list[Sample]:
    """One dataset record as Samples: the image(s) stored under `images`, the prompt, and one
    sample per answer text (a record with a list of captions gives one per caption)."""
    wanted = [(args.image_column, "--image-column"), (args.text_column, "--text-column"),
              (args.id_column, "--id-column")]
    for column, flag in wanted:
        if column is not None and column not in row:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(map(str, row))}) — "
                            f"name the right one with {flag}")
    value = row[args.image_column]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise DataError(f"{where}: column {args.image_column!r} is an empty list — every record needs an image")
    paths = [store_image(_image_bytes(v, where, args.image_column, base), where, args.image_column, images)
             for v in values]
    answers = _answers(row[args.text_column], where, args.text_column)
    # csv holds no prompt (image and answer only): the training config's data.prompt supplies it.
    prompt = args.prompt if args.format != "csv" else ""
    user = IMAGE * len(paths) + (f"\n{prompt}" if prompt else "")
    sample_id = None
    if args.id_column is not None:
        raw = row[args.id_column]
        if raw is None or not str(raw).strip():
            raise DataError(f"{where}: column {args.id_column!r} (the id) is empty — every record needs an id")
        sample_id = str(raw)
    # The recipe's image id (COCO's image_id) is kept when the copy has it; grouping needs only the image.
    meta = {args.group_column: row[args.group_column]} if args.group_column in row else {}
    if sample_id is None or len(answers) == 1:
        ids = [sample_id] * len(answers)
    else:  # one id per caption of the record: ID-1, ID-2, ...
        ids = [f"{sample_id}-{k}" for k in range(1, len(answers) + 1)]
    return [Sample(images=paths, turns=[Turn("user", user), Turn("assistant", answer)], id=i, source=where,
                   meta=dict(meta)) for answer, i in zip(answers, ids)]


def collect_samples(args: PrepareArgs, ds, images: Path) -> tuple[list[Sample], int]:
    """The first --limit samples, images stored; also how many duplicate records were skipped.

    Every caption of an image is kept (one sample each), whether the dataset has a row per caption
    or a list of captions per row; a row's captions are never cut apart by --limit. The same
    caption twice for one image is kept once.

    Raises:
        DataError: a bad record (missing column, undecodable image, empty text, repeated id).
    """
    images.mkdir(parents=True, exist_ok=True)
    base = os.path.dirname(args.local) if args.local and os.path.isfile(args.local) else args.local or os.getcwd()
    samples: list[Sample] = []
    owner: dict[str, str] = {}  # id -> record that has it
    seen: set = set()  # (image, answer) pairs already taken
    skipped = 0
    with tqdm(total=args.limit, desc=f"prepare {args.recipe or args.label}", unit="sample", disable=None) as bar:
        for index, row in enumerate(records(ds, args.label)):
            where = f"{args.label}:{index}"
            row_samples = record_samples(row, where, args, base, images)
            for sample in row_samples:
                if args.group_column or len(row_samples) > 1:
                    # COCO repeats a record when an image has the same caption twice: keep one.
                    image = sample.meta.get(args.group_column, sample.images)
                    key = (json.dumps(image, default=str), sample.answer())
                    if key in seen:
                        skipped += 1
                        continue
                    seen.add(key)
                if sample.id is not None:
                    if sample.id in owner:
                        raise DataError(f"{where}: id {sample.id!r} is already the id of {owner[sample.id]} — ids "
                                        "must be unique; fix the data, or leave out --id-column to number records "
                                        "identity_1, ...")
                    owner[sample.id] = where
                samples.append(sample)
                bar.update()
            if args.limit is not None and len(samples) >= args.limit:
                break
    for number, sample in enumerate(samples, start=1):
        if sample.id is None:
            sample.id = f"identity_{number}"  # the tutorials' ids, in source order
    return samples, skipped


# --- the output folder -------------------------------------------------------------------------

def _output_names(format: str, shards: int | None = None) -> tuple[str, str]:
    if shards:
        return "train", "val"  # shard folders
    ext = ".csv" if format == "csv" else ".json"
    return f"train{ext}", f"val{ext}"


def already_prepared(out: Path, args: PrepareArgs) -> dict | None:
    """The prepare.json record if `out` holds exactly this dataset; None if `out` is absent or
    empty. Anything else is refused."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise VlmtuneError(f"{out} exists and is not a folder; pass another --out")
    if not any(out.iterdir()):
        return None
    try:
        recorded = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), dict):
        raise VlmtuneError(f"{out} already exists and is not empty, and it is not a prepared dataset (no readable "
                           "prepare.json). Pass a new --out or remove that folder first; nothing was written.")
    wanted = asdict(args)
    recorded["args"].setdefault("shards", None)  # written before --shards existed
    complete = all((out / name).exists() for name in _output_names(args.format, args.shards))
    if recorded["args"] == wanted and recorded.get("version") == PREPARE_VERSION and complete:
        return recorded
    diff = ", ".join(f"{k}={recorded['args'].get(k)!r} (asked {v!r})" for k, v in wanted.items()
                     if recorded["args"].get(k) != v)
    diff = diff or ("it was written by another vlmtune version" if recorded.get("version") != PREPARE_VERSION
                    else "its training files are missing")
    raise VlmtuneError(f"{out} already holds another prepared dataset: {diff}. Pass a new --out or remove that "
                       "folder first; nothing was written.")


def prepare(args: PrepareArgs, out: str | Path) -> dict:
    """Write the dataset `args` describes to `out` (atomically) and return its prepare.json record.

    Raises:
        VlmtuneError: the hub cannot be reached, or `out` holds something else.
        DataError: a bad record; nothing is written.
    """
    out = Path(out)
    recorded = already_prepared(out, args)
    if recorded is not None:
        return recorded
    ds = open_source(args)  # before the temporary folder: a hub that does not answer leaves nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    with removed_on_failure(tmp, out, f"the dataset {out}"):
        samples, skipped = collect_samples(args, ds, tmp / "images")
        try:
            train, val = split_samples(samples, args.val, args.seed)
        except VlmtuneError as e:
            raise VlmtuneError(f"{args.label}: {len(samples)} sample(s) read; {e}") from None
        train_name, val_name = _output_names(args.format, args.shards)
        n_images = len(os.listdir(tmp / "images"))
        if args.shards:  # images embedded in the shards (vlmtune/data/shards.py): images/ is not kept
            write_shards(train, tmp / train_name, args.shards, "train", base=tmp)
            write_shards(val, tmp / val_name, min(args.shards, max(1, len(val))), "val", base=tmp)
            shutil.rmtree(tmp / "images")
        else:
            write_samples(train, tmp / train_name, args.format)
            write_samples(val, tmp / val_name, args.format)
        record = {"version": PREPARE_VERSION, "args": asdict(args), "train": len(train), "val": len(val),
                  "images": n_images, "duplicates_skipped": skipped}
        (tmp / "prepare.json").write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        try:
            if out.is_dir():
                out.rmdir()  # empty, as checked above; a rename cannot replace a folder with content
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
            os.rename(tmp, out)
        except OSError as e:
            raise VlmtuneError(f"could not move the prepared dataset into {out}: {e}") from e
    return record


def prepare_command(recipe: Literal["latex-ocr", "coco-caption"] | None = None, /, *, out: str,
                    source: Literal["modelscope", "hf"] = "modelscope", dataset: str | None = None,
                    subset: str | None = None, split: str = "train", image_column: str | None = None,
                    text_column: str | None = None, id_column: str | None = None, local: str | None = None,
                    limit: int | None = None, val: str = "4", seed: int = 0, prompt: str | None = None,
                    format: Literal["minicpm", "qwen", "messages", "llava", "csv"] = "minicpm",
                    shards: int | None = None) -> int:
    """Download (or read from local files) an image-text dataset and write training files.

    Writes OUT/images/ (each image once, named by a hash of its bytes), OUT/train.json and
    OUT/val.json (.csv for --format csv) with image paths relative to OUT, and OUT/prepare.json
    with the arguments. The same command again does nothing; a non-empty OUT holding anything
    else is refused. Nothing is left behind when it fails.

    Args:
        recipe: A named dataset: latex-ocr (LaTeX_OCR formula images, as the LaTeX OCR tutorials) or
            coco-caption (COCO 2014 captions, as the COCO captions (Qwen2-VL) tutorial). Leave it out for the generic form (--dataset or --local
            with --image-column and --text-column).
        out: Output folder; must not exist, be empty, or hold this very dataset.
        source: Hub to download from: modelscope (as the tutorials; pip install 'vlmtune[modelscope]') or hf.
        dataset: Hub dataset id (generic form, or another copy of a recipe's dataset).
        subset: Hub subset / config name (default: the recipe's).
        split: Split to read.
        image_column: Column holding the image (an image feature, bytes, or a path).
        text_column: Column holding the answer text.
        id_column: Column to use as record id (must be unique); default ids are identity_1, identity_2, ...
        local: Read the dataset from local files instead of a hub: a parquet, arrow, json(l) or csv
            file, a folder of them, a `save_to_disk` folder, or an image folder with metadata.jsonl/csv.
        limit: Take only the first LIMIT samples (train + val) of the split (a record with a list of
            captions is kept whole).
        val: Validation size in images: a count ("4", as the tutorials) or a fraction ("0.1"); all
            captions of an image go to the same side.
        seed: Seed of the train/val draw (the same as `vlmtune data split`).
        prompt: User prompt after the image placeholder (default: the recipe's tutorial prompt; none for
            the generic form). Use "" for none.
        format: Training file format: minicpm (the MiniCPM tutorials'), qwen, messages, llava or csv.
        shards: Write OUT/train/ and OUT/val/ as this many Parquet shards each, with the images embedded
            (no images/ folder; for large datasets), instead of train.json and val.json. Train on them
            with data.train=OUT/train.
    """
    args = resolve_args(recipe, source=source, dataset=dataset, subset=subset, split=split, image_column=image_column,
                        text_column=text_column, id_column=id_column, local=local, limit=limit, val=val, seed=seed,
                        prompt=prompt, format=format)
    if shards is not None:
        if shards < 1:
            raise VlmtuneError(f"--shards {shards}: give at least 1")
        args = replace(args, shards=shards)
    already = already_prepared(Path(out), args)
    if already is not None:
        print(f"{out} is already prepared with these arguments ({already['train']} train + {already['val']} val); "
              "nothing to do")
        return 0
    record = prepare(args, out)
    train_name, val_name = _output_names(format, shards)
    skipped = f"; {record['duplicates_skipped']} duplicate record(s) skipped" if record["duplicates_skipped"] else ""
    where = (f"{train_name}/ and {val_name}/: {shards} Parquet shard(s) each, {record['images']} images embedded"
             if shards else f"{train_name}, {val_name}, {record['images']} images in images/")
    print(f"prepared {record['train']} train + {record['val']} val samples from {args.label} in {out} "
          f"({where}){skipped}")
    if format == "csv" and args.prompt:
        print(f"note: csv files hold no prompt; set data.prompt: {json.dumps(args.prompt, ensure_ascii=False)} "
              "in the training config")
    return 0
