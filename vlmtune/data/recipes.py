"""Where `vlmtune data prepare` reads records from: the named recipes, the hubs, local files.

A recipe is plain data: the dataset id and subset on each hub, the image and text columns, the
default prompt (the tutorials' prompts, verbatim) and, for datasets with several answers per
image, the column naming the image (kept in each sample's `meta`). Every field can be overridden
on the command line (`--dataset`, `--subset`, `--image-column`, ...), so a recipe is only a set
of defaults, and the generic form (`--dataset ID --image-column C --text-column C`) is a recipe
with none. `resolve_args` turns a recipe plus the command line into `PrepareArgs`, the record
of a prepared folder.

`open_source` gives the records of Hugging Face (`datasets.load_dataset`, streamed, so --limit
reads only what it needs), ModelScope (`MsDataset.load`, as the tutorials call it) or local files
(the `datasets` local loaders), with image columns left undecoded: {"bytes", "path"}. Before a
hub library is called, the hub (or the proxy in front of it) is probed with a 3-second connect:
offline, the libraries' own retries take half a minute or more, and the answer to "no network"
is --local, which the error says.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from vlmtune.data.split import parse_val
from vlmtune.data.synth import CAPTION_PROMPT, LATEX_PROMPT
from vlmtune.errors import DataError, VlmtuneError


@dataclass(frozen=True)
class Recipe:
    modelscope: tuple[str, str | None] | None  # (dataset id, subset) on ModelScope
    hf: tuple[str, str | None] | None  # (dataset id, subset) on the Hugging Face hub
    image_column: str
    text_column: str
    prompt: str  # user text after the image placeholder
    group_column: str | None = None  # names the image of a record when an image has several answers


RECIPES: dict[str, Recipe] = {
    # LaTeX OCR: a formula image and its LaTeX source.
    "latex-ocr": Recipe(modelscope=("AI-ModelScope/LaTeX_OCR", "default"), hf=("linxy/LaTeX_OCR", "default"),
                        image_column="image", text_column="text", prompt=LATEX_PROMPT),
    # COCO captions: COCO 2014 captions, about five rows (one per caption) for each image_id; copies that hold
    # a list of captions per image work too (one sample per caption either way).
    "coco-caption": Recipe(modelscope=("modelscope/coco_2014_caption", "coco_2014_caption"), hf=None,
                           image_column="image", text_column="caption", prompt=CAPTION_PROMPT,
                           group_column="image_id"),
}

PROBE_TIMEOUT = 3.0
LOCAL_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
NO_NETWORK_HINT = ("without network, download the dataset elsewhere and prepare it from the files with "
                   "--local PATH (parquet, arrow, json(l), csv or an image folder)")


@dataclass(frozen=True)
class PrepareArgs:
    """The resolved arguments: what prepare.json records and what a re-run is compared against."""

    recipe: str | None
    source: str  # "modelscope", "hf" or "local"
    dataset: str | None  # hub id (None for local)
    subset: str | None
    split: str
    local: str | None  # absolute path
    image_column: str
    text_column: str
    id_column: str | None
    group_column: str | None
    limit: int | None
    val: str
    seed: int
    prompt: str
    format: str
    shards: int | None = None  # write N Parquet shards with the images embedded instead of JSON + images/

    @property
    def label(self) -> str:
        """How messages name the source; a record is `LABEL:INDEX`."""
        if self.local is not None:
            return self.local
        return f"{self.source}:{self.dataset}{'/' + self.subset if self.subset else ''}[{self.split}]"


def resolve_args(recipe: str | None, *, source: str, dataset: str | None, subset: str | None, split: str,
                 image_column: str | None, text_column: str | None, id_column: str | None, local: str | None,
                 limit: int | None, val: str, seed: int, prompt: str | None, format: str) -> PrepareArgs:
    """Fill what the command line left out from the recipe, and refuse contradictions early
    (before anything is downloaded)."""
    if recipe is not None and recipe not in RECIPES:
        raise VlmtuneError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}, or use --dataset/--local "
                           "with --image-column and --text-column")
    base = RECIPES.get(recipe)
    if local is not None:
        if dataset is not None or subset is not None:
            raise VlmtuneError("--local reads local files; --dataset and --subset name a hub dataset — give one or the other")
        source, local = "local", os.path.abspath(os.path.expanduser(local))
    elif dataset is None:
        if base is None:
            raise VlmtuneError("nothing to prepare: give a recipe (--recipe latex-ocr or coco-caption), or --dataset ID "
                               "(or --local PATH) with --image-column and --text-column")
        hub = base.modelscope if source == "modelscope" else base.hf
        if hub is None:
            raise VlmtuneError(f"recipe {recipe} has no {source} dataset id; use --source "
                               f"{'hf' if source == 'modelscope' else 'modelscope'}, or name a copy with --dataset ID")
        dataset, subset = hub[0], subset if subset is not None else hub[1]
    if base is None and (image_column is None or text_column is None):
        raise VlmtuneError("the generic form needs --image-column and --text-column (the columns holding the image "
                           "and the answer text)")
    if limit is not None and limit < 1:
        raise VlmtuneError(f"--limit {limit}: give a positive number of samples, or leave it out to take them all")
    parse_val(val, limit if limit is not None else 10**9)  # a bad --val fails now, not after the download
    if prompt is None:
        prompt = base.prompt if base is not None else ""
    return PrepareArgs(recipe=recipe, source=source, dataset=dataset, subset=subset, split=split, local=local,
                       image_column=image_column or base.image_column, text_column=text_column or base.text_column,
                       id_column=id_column, group_column=base.group_column if base is not None else None,
                       limit=limit, val=str(val), seed=seed, prompt=prompt, format=format)


# --- opening the source ------------------------------------------------------------------------

def _probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds, else what went wrong.

    Runs in a thread because the name lookup ignores socket timeouts; a hung resolver would
    otherwise hang the command.
    """
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _address(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else "https://" + url)
    return parsed.hostname or url, parsed.port or (80 if parsed.scheme == "http" else 443)


def require_hub(hub: str, url: str, dataset: str) -> None:
    """Raise a clear error within seconds when `url` (or the proxy in front of it) does not answer."""
    host, port = _address(url)
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        host, port = _address(proxy)  # the download goes through the proxy, so that is what must answer
    problem = _probe(host, port)
    if problem is not None:
        raise VlmtuneError(f"could not reach {hub} at {host}:{port} ({problem}) to download {dataset}. "
                           f"Check the network; {NO_NETWORK_HINT}.")


def _open_hf(args: PrepareArgs):
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:  # offline mode reads the local cache: no host to probe
        require_hub("the Hugging Face hub", os.environ.get("HF_ENDPOINT", "https://huggingface.co"), args.dataset)
    import datasets

    # Streaming reads only the first --limit records instead of downloading the whole split.
    return datasets.load_dataset(args.dataset, args.subset, split=args.split, streaming=True)


def _open_modelscope(args: PrepareArgs):
    require_hub("ModelScope", os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn"), args.dataset)
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError:
        raise VlmtuneError("--source modelscope needs the modelscope package: pip install 'vlmtune[modelscope]' "
                           "(or use --source hf, or --local PATH for files you already have)") from None
    ds = MsDataset.load(args.dataset, subset_name=args.subset, split=args.split)  # as the tutorials call it
    return ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds


def _open_local(args: PrepareArgs):
    import datasets

    path = Path(args.local)
    if not path.exists():
        raise DataError(f"--local {path}: no such file or folder")
    if path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))  # a `save_to_disk` folder (arrow files)
        if isinstance(ds, datasets.DatasetDict):
            if args.split not in ds:
                raise DataError(f"--local {path}: no split {args.split!r} (splits: {', '.join(ds)}) — pass --split")
            ds = ds[args.split]
        return ds
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"--local {path}: unknown file type {path.suffix!r} — give a "
                            f"{', '.join(LOCAL_BUILDERS)} file or a folder of them (or an image folder)")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    # A folder: `datasets` picks the builder from the files (parquet, arrow, json, csv, or an image
    # folder with metadata.jsonl/csv) and the split from the file names.
    return datasets.load_dataset(str(path), split=args.split, streaming=True)


def _undecoded(ds, columns: list[str]):
    """Image columns as {"bytes", "path"}: the original encoded bytes, not decoded pixels."""
    import datasets

    features = getattr(ds, "features", None) or {}
    for column in columns:
        feature = features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.Sequence) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


def open_source(args: PrepareArgs):
    """The records of the dataset `args` names, as an iterable of dicts (images undecoded)."""
    opener = {"local": _open_local, "hf": _open_hf, "modelscope": _open_modelscope}[args.source]
    try:
        ds = opener(args)
        return _undecoded(ds, [args.image_column])
    except VlmtuneError:
        raise
    except Exception as e:  # the libraries raise many classes for a bad id, split or file
        hint = (f"check the file or folder (--split {args.split!r} for a folder)" if args.source == "local"
                else f"check the dataset id, --subset and --split; {NO_NETWORK_HINT}")
        raise DataError(f"could not open {args.label} ({type(e).__name__}: {_first_line(e)}) — {hint}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def records(ds, label: str) -> Iterator[dict]:
    """The records in order; a failure while reading one names it."""
    it = iter(ds)
    index = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{label}:{index}: could not read this record ({type(e).__name__}: {_first_line(e)})") from None
        yield row
        index += 1
