"""`vlmtune data prepare` end to end on local copies of the hubs' datasets, offline: every recipe
and the generic form, the files written, re-runs, refusals, the hub without network, and each
kind of bad record leaving nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from vlmtune import cli
from vlmtune.data import recipes
from vlmtune.data.formats import FORMATS, load_samples
from vlmtune.data.prepare import prepare_command
from vlmtune.data.recipes import resolve_args
from vlmtune.data.synth import CAPTION_PROMPT, LATEX_PROMPT
from vlmtune.errors import DataError, VlmtuneError

IMAGE_FEATURES = {"image": datasets.Image()}


def encoded(i: int, fmt: str = "PNG", size: tuple[int, int] = (12, 8)) -> bytes:
    """A small image of colour number i, encoded."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (20 * i % 256, 255 - 20 * i % 256, 90)).save(buffer, fmt)
    return buffer.getvalue()


def latex_parquet(path: Path, texts: list[str], images: list[bytes] | None = None, text_column: str = "text") -> Path:
    """The LaTeX_OCR schema: an image struct column {bytes, path} and a text column."""
    images = images if images is not None else [encoded(i) for i in range(len(texts))]
    features = datasets.Features({**IMAGE_FEATURES, text_column: datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], text_column: texts},
                               features=features).to_parquet(str(path))
    return path


COCO_ROWS = [(9, "A cat on a mat."), (9, "A cat sleeping."), (25, "Two dogs."), (9, "A cat on a mat."),
             (25, "Dogs in a park."), (30, "A red bus."), (30, "A bus on a street.")]  # row 3 repeats row 0


def coco_arrow(folder: Path) -> Path:
    """The coco_2014_caption schema (image_id, caption, image) as a `save_to_disk` arrow folder."""
    jpeg = {image_id: encoded(image_id, "JPEG", (16, 12)) for image_id, _ in COCO_ROWS}
    features = datasets.Features({"image_id": datasets.Value("int64"), "caption": datasets.Value("string"),
                                  **IMAGE_FEATURES})
    datasets.Dataset.from_dict({"image_id": [i for i, _ in COCO_ROWS], "caption": [c for _, c in COCO_ROWS],
                                "image": [{"bytes": jpeg[i], "path": None} for i, _ in COCO_ROWS]},
                               features=features).save_to_disk(str(folder))
    return folder


def image_folder(folder: Path, texts: list[str]) -> Path:
    """An imagefolder: image files plus metadata.jsonl naming each file and its text."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            (folder / f"{i}.png").write_bytes(encoded(i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return folder


def json_with_paths(folder: Path, records: list[dict]) -> Path:
    """A JSON list whose image column holds paths relative to the file."""
    (folder / "imgs").mkdir(parents=True)
    for i in range(len(records)):
        (folder / "imgs" / f"{i}.png").write_bytes(encoded(i))
    path = folder / "records.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def files(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root with its mtime (ns) and bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def val_positions(n: int, count: int, seed: int) -> list[int]:
    """Positions `vlmtune data split` puts in val for n samples."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:count])


def check_images(out: Path, samples) -> None:
    for sample in samples:
        for path in sample.images:
            assert Path(path).parent == out / "images" and Path(path).is_file()
            with Image.open(path) as im:
                im.load()


# --- recipes and the generic form --------------------------------------------------------------

def test_latex_ocr_from_local_parquet(tmp_path, capsys):
    texts = [f"x^{{{i}}}" for i in range(6)]
    images = [encoded(i) for i in range(6)]
    src = latex_parquet(tmp_path / "train.parquet", texts, images)
    out = tmp_path / "latex"
    assert prepare_command("latex-ocr", out=str(out), local=str(src), val="2") == 0
    assert f"prepared 4 train + 2 val samples from {src} in {out}" in capsys.readouterr().out

    records = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert records[0] == {"id": "identity_1", "image": f"images/{hashlib.sha256(images[0]).hexdigest()[:16]}.png",
                          "conversations": [{"role": "user", "content": f"<image>\n{LATEX_PROMPT}"},
                                            {"role": "assistant", "content": texts[0]}]}
    train, val = load_samples(out / "train.json"), load_samples(out / "val.json")
    check_images(out, train + val)
    in_val = val_positions(6, 2, seed=0)
    assert [s.answer() for s in val] == [texts[i] for i in in_val]
    assert [s.answer() for s in train] == [t for i, t in enumerate(texts) if i not in in_val]
    assert sorted(s.id for s in train + val) == sorted(f"identity_{i}" for i in range(1, 7))
    for sample in train + val:  # the dataset's bytes, unchanged, under their own hash
        number = texts.index(sample.answer())
        assert Path(sample.images[0]).read_bytes() == images[number]
    recorded = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    assert recorded["args"]["recipe"] == "latex-ocr" and recorded["args"]["local"] == str(src)
    assert (recorded["train"], recorded["val"], recorded["images"]) == (4, 2, 6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_limit_val_and_seed_are_honoured(tmp_path):
    texts = [f"a_{{{i}}}" for i in range(10)]
    src = latex_parquet(tmp_path / "train.parquet", texts)
    kwargs = dict(local=str(src), limit=6, val="0.5", seed=3)
    prepare_command("latex-ocr", out=str(tmp_path / "a"), **kwargs)
    train, val = load_samples(tmp_path / "a" / "train.json"), load_samples(tmp_path / "a" / "val.json")
    assert (len(train), len(val)) == (3, 3)
    assert [s.answer() for s in val] == [texts[i] for i in val_positions(6, 3, seed=3)]
    assert sorted(s.answer() for s in train + val) == sorted(texts[:6])  # the first LIMIT records
    assert len(list((tmp_path / "a" / "images").iterdir())) == 6

    prepare_command("latex-ocr", out=str(tmp_path / "b"), **kwargs)  # same arguments, same bytes
    assert {k: v[1] for k, v in files(tmp_path / "a").items()} == {k: v[1] for k, v in files(tmp_path / "b").items()}

    seed = next(s for s in range(4, 100) if val_positions(6, 3, s) != val_positions(6, 3, 3))
    prepare_command("latex-ocr", out=str(tmp_path / "c"), **{**kwargs, "seed": seed})
    assert [s.answer() for s in load_samples(tmp_path / "c" / "val.json")] == [texts[i] for i in val_positions(6, 3, seed)]


def test_rerun_is_a_noop_and_other_arguments_are_refused(tmp_path, capsys):
    src = latex_parquet(tmp_path / "train.parquet", ["a", "b", "c", "d", "e"])
    out = tmp_path / "out"
    prepare_command("latex-ocr", out=str(out), local=str(src), val="1")
    before = files(out)
    capsys.readouterr()
    time.sleep(0.01)  # so that a rewrite would show in the mtimes
    assert prepare_command("latex-ocr", out=str(out), local=str(src), val="1") == 0
    assert "already prepared with these arguments (4 train + 1 val); nothing to do" in capsys.readouterr().out
    assert files(out) == before  # nothing rewritten: same bytes, same mtimes

    with pytest.raises(VlmtuneError, match=r"another prepared dataset: val='1' \(asked '2'\), seed=0 \(asked 1\)"):
        prepare_command("latex-ocr", out=str(out), local=str(src), val="2", seed=1)
    assert cli.main(["data", "prepare", "--local", str(src), "--image-column", "image", "--text-column", "text",
                     "--out", str(out)]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert files(out) == before

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(VlmtuneError, match="not a prepared dataset"):
        prepare_command("latex-ocr", out=str(tmp_path / "other"), local=str(src), val="1")
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert prepare_command("latex-ocr", out=str(tmp_path / "empty"), local=str(src), val="1") == 0


def test_coco_caption_from_local_arrow_keeps_image_ids_and_stores_each_image_once(tmp_path, capsys):
    src = coco_arrow(tmp_path / "coco_arrow")
    out = tmp_path / "coco"
    assert prepare_command("coco-caption", out=str(out), local=str(src), val="2", format="qwen") == 0
    assert "1 duplicate record(s) skipped" in capsys.readouterr().out
    train, val = load_samples(out / "train.json"), load_samples(out / "val.json")
    check_images(out, train + val)
    unique = [row for i, row in enumerate(COCO_ROWS) if i != 3]
    assert sorted((s.meta["image_id"], s.answer()) for s in train + val) == sorted(unique)
    assert all(s.turns[0].text == f"<image>\n{CAPTION_PROMPT}" for s in train + val)
    stored = sorted((out / "images").iterdir())
    assert len(stored) == 3 and all(p.suffix == ".jpg" for p in stored)  # one JPEG per image_id, not re-encoded
    by_id = {s.meta["image_id"]: s.images[0] for s in train + val}
    assert Path(by_id[25]).read_bytes() == encoded(25, "JPEG", (16, 12))
    record = json.loads((out / "val.json").read_text(encoding="utf-8"))[0]
    assert record["conversations"][0]["value"].startswith("<|vision_start|>images/") and "image_id" in record


def test_coco_caption_split_keeps_every_caption_of_an_image_on_one_side(tmp_path):
    src = coco_arrow(tmp_path / "coco_arrow")
    for seed in range(6):
        out = tmp_path / f"coco{seed}"
        prepare_command("coco-caption", out=str(out), local=str(src), val="1", seed=seed)
        train, val = load_samples(out / "train.json"), load_samples(out / "val.json")
        val_ids, train_ids = {s.meta["image_id"] for s in val}, {s.meta["image_id"] for s in train}
        assert len(val_ids) == 1 and not val_ids & train_ids, seed  # --val counts images
        assert len(train) + len(val) == len(COCO_ROWS) - 1  # every caption, the repeated one once


def coco_list_parquet(path: Path, captions: dict[int, list[str]]) -> Path:
    """A COCO copy with one row per image and all its captions in a list column."""
    features = datasets.Features({"image_id": datasets.Value("int64"),
                                  "caption": datasets.Sequence(datasets.Value("string")), **IMAGE_FEATURES})
    datasets.Dataset.from_dict({"image_id": list(captions), "caption": list(captions.values()),
                                "image": [{"bytes": encoded(i, "JPEG", (16, 12)), "path": None} for i in captions]},
                               features=features).to_parquet(str(path))
    return path


def test_coco_caption_from_a_list_of_captions_per_image(tmp_path, capsys):
    captions = {7: ["A cat.", "A cat on a mat.", "A sleeping cat.", "A cat.", "The cat sleeps."],
                8: ["Two dogs.", "Dogs play.", "Two dogs in a park."],
                9: ["A red bus.", "A bus on a street.", "A big red bus.", "Bus.", "A bus stops."]}
    src = coco_list_parquet(tmp_path / "coco.parquet", captions)
    out = tmp_path / "coco"
    assert prepare_command("coco-caption", out=str(out), local=str(src), val="1", id_column="image_id") == 0
    assert "3 images in images/); 1 duplicate record(s) skipped" in capsys.readouterr().out
    train, val = load_samples(out / "train.json"), load_samples(out / "val.json")
    kept = {image_id: list(dict.fromkeys(texts)) for image_id, texts in captions.items()}  # "A cat." once
    assert sorted((s.meta["image_id"], s.answer()) for s in train + val) == sorted(
        (i, t) for i, texts in kept.items() for t in texts)
    assert len({s.meta["image_id"] for s in val}) == 1
    assert not {s.images[0] for s in val} & {s.images[0] for s in train}
    assert len(list((out / "images").iterdir())) == 3
    assert sorted(s.id for s in train + val if s.meta["image_id"] == 8) == ["8-1", "8-2", "8-3"]


def test_generic_form_from_an_image_folder_through_the_cli(tmp_path):
    texts = ["one", "two", "three", "four"]
    src = image_folder(tmp_path / "imagefolder", texts)
    out = tmp_path / "out"
    assert cli.main(["data", "prepare", "--local", str(src), "--image-column", "image", "--text-column", "text",
                     "--out", str(out), "--val", "1", "--format", "messages", "--prompt", "Describe."]) == 0
    samples = load_samples(out / "train.json") + load_samples(out / "val.json")
    check_images(out, samples)
    assert sorted(s.answer() for s in samples) == sorted(texts)
    assert all(s.turns[0].text == "<image>\nDescribe." for s in samples)
    for sample in samples:
        assert Path(sample.images[0]).read_bytes() == (src / f"{texts.index(sample.answer())}.png").read_bytes()


@pytest.mark.parametrize("format", FORMATS)
def test_generic_form_from_json_with_image_paths_in_every_format(tmp_path, format):
    records = [{"key": f"r{i}", "picture": f"imgs/{i}.png", "answer": f"answer {i}"} for i in range(4)]
    src = json_with_paths(tmp_path / "raw", records)
    out = tmp_path / "out"
    prepare_command(out=str(out), local=str(src), image_column="picture", text_column="answer", id_column="key",
                    val="1", format=format, prompt="Q?")
    ext = ".csv" if format == "csv" else ".json"
    samples = load_samples(out / f"train{ext}") + load_samples(out / f"val{ext}")
    check_images(out, samples)
    assert sorted((s.id, s.answer()) for s in samples) == [(r["key"], r["answer"]) for r in records]
    user = "<image>" if format == "csv" else "<image>\nQ?"  # csv keeps the image and the answer only
    assert all(s.turns[0].text == user for s in samples)


def test_recipe_columns_can_be_overridden_for_a_local_copy(tmp_path):
    src = latex_parquet(tmp_path / "train.parquet", ["a", "b", "c"], text_column="latex")
    prepare_command("latex-ocr", out=str(tmp_path / "out"), local=str(src), text_column="latex", val="1")
    assert sorted(s.answer() for s in load_samples(tmp_path / "out" / "train.json")) in (["a", "b"], ["a", "c"], ["b", "c"])


# --- the hubs ------------------------------------------------------------------------------------

@pytest.fixture
def no_hub(monkeypatch):
    """Point both hubs at a closed local port: an unreachable hub on any machine, network or not."""
    for name in ("HTTPS_PROXY", "https_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")


@pytest.mark.parametrize("source", ["hf", "modelscope"])
def test_unreachable_hub_fails_fast_with_a_hint_and_leaves_nothing(tmp_path, no_hub, source):
    start = time.monotonic()
    with pytest.raises(VlmtuneError, match=r"could not reach .* at 127\.0\.0\.1:9 .*--local PATH"):
        prepare_command("latex-ocr", out=str(tmp_path / "out"), source=source)
    # The libraries' own retries take 25 s or more offline; the probe answers at once. The bound is loose.
    assert time.monotonic() - start < 15
    assert list(tmp_path.iterdir()) == []


def test_hub_without_network_for_real(tmp_path, capsys):
    if recipes._probe("huggingface.co", 443) is None:
        pytest.skip("this machine can reach huggingface.co")
    start = time.monotonic()
    assert cli.main(["data", "prepare", "--dataset", "linxy/LaTeX_OCR", "--source", "hf", "--image-column", "image",
                     "--text-column", "text", "--out", str(tmp_path / "out")]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face hub at huggingface.co:443" in err and "--local PATH" in err
    assert list(tmp_path.iterdir()) == []


def test_the_probe_goes_to_the_proxy_when_one_is_set(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(VlmtuneError, match=r"could not reach ModelScope at 127\.0\.0\.1:9"):
        recipes.require_hub("ModelScope", "www.modelscope.cn", "AI-ModelScope/LaTeX_OCR")


def test_modelscope_package_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "_probe", lambda host, port: None)  # as if the hub answered
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", None)
    with pytest.raises(VlmtuneError, match=r"pip install 'vlmtune\[modelscope\]'"):
        prepare_command("coco-caption", out=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


# --- bad input -----------------------------------------------------------------------------------

def truncated_jpeg() -> bytes:
    data = encoded(1, "JPEG", (64, 64))
    return data[: len(data) // 2]


BAD_INPUTS = {
    "missing column": (lambda d: latex_parquet(d / "train.parquet", ["a", "b"], text_column="latex"),
                       {}, r"train\.parquet:0: no column 'text' \(columns: image, latex\) — name the right one with --text-column"),
    "garbage image": (lambda d: latex_parquet(d / "train.parquet", ["a", "b", "c"], [encoded(0), encoded(1), b"not an image"]),
                      {}, r"train\.parquet:2: the image in column 'image' cannot be decoded \(UnidentifiedImageError"),
    "truncated image": (lambda d: latex_parquet(d / "train.parquet", ["a", "b"], [encoded(0), truncated_jpeg()]),
                        {}, r"train\.parquet:1: the image in column 'image' cannot be decoded \(OSError: "),
    "empty text": (lambda d: latex_parquet(d / "train.parquet", ["a", "  ", "c"]),
                   {}, r"train\.parquet:1: column 'text' is empty"),
    "missing image file": (lambda d: json_with_paths(d / "raw", [{"image": "imgs/0.png", "text": "a"},
                                                                 {"image": "imgs/nope.png", "text": "b"}]),
                           {}, r"records\.json:1: cannot read the image file .*imgs/nope\.png named in column 'image'"),
    "duplicate id": (lambda d: json_with_paths(d / "raw", [{"id": f"r{i % 2}", "image": f"imgs/{i}.png", "text": "t"}
                                                           for i in range(3)]),
                     {"id_column": "id"}, r"records\.json:2: id 'r0' is already the id of .*records\.json:0 — ids must be unique"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_record_is_named_and_nothing_is_written(tmp_path, case):
    build, extra, message = BAD_INPUTS[case]
    src = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=message):
        prepare_command("latex-ocr", out=str(tmp_path / "out"), local=str(src), val="1", **extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no temporary folder


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"nothing to prepare: give a recipe"),
    ({"dataset": "me/data", "image_column": "image"}, r"generic form needs --image-column and --text-column"),
    ({"recipe": "coco-caption", "source": "hf"}, r"recipe coco-caption has no hf dataset id"),
    ({"recipe": "latex-ocr", "local": "x.parquet", "dataset": "me/data"}, r"--local reads local files"),
    ({"recipe": "latex-ocr", "val": "lots"}, r"--val 'lots' is not a count"),
    ({"recipe": "latex-ocr", "limit": 3, "val": "3"}, r"--val 3 asks for 3 of 3 samples"),
])
def test_contradictory_arguments_are_refused_before_any_download(kwargs, message):
    defaults = dict(recipe=None, source="modelscope", dataset=None, subset=None, split="train", image_column=None,
                    text_column=None, id_column=None, local=None, limit=None, val="4", seed=0, prompt=None,
                    format="minicpm")
    defaults.update(kwargs)
    with pytest.raises(VlmtuneError, match=message):
        resolve_args(defaults.pop("recipe"), **defaults)


def test_recipes_resolve_to_the_seeds_datasets():
    common = dict(dataset=None, subset=None, split="train", image_column=None, text_column=None, id_column=None,
                  local=None, limit=None, val="4", seed=0, prompt=None, format="minicpm")
    latex = resolve_args("latex-ocr", source="modelscope", **common)
    assert (latex.dataset, latex.subset, latex.image_column, latex.text_column, latex.prompt) == (
        "AI-ModelScope/LaTeX_OCR", "default", "image", "text", LATEX_PROMPT)
    assert resolve_args("latex-ocr", source="hf", **common).dataset == "linxy/LaTeX_OCR"
    coco = resolve_args("coco-caption", source="modelscope", **common)
    assert (coco.dataset, coco.subset, coco.text_column, coco.group_column, coco.prompt) == (
        "modelscope/coco_2014_caption", "coco_2014_caption", "caption", "image_id", CAPTION_PROMPT)
