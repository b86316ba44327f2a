"""The one train/validation split rule (`vlmtune.data.split`): whole image groups, the same split
from `data split`, `data prepare` and the in-training `data.val_size` split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.formats import load_samples
from vlmtune.data.prepare import prepare_command
from vlmtune.data.sample import Sample, Turn
from vlmtune.data.split import image_groups, split_samples
from vlmtune.errors import VlmtuneError

N_IMAGES = 12


def coco_like(folder: Path) -> list[tuple[str, str]]:
    """(image path relative to folder, caption) records: 12 images with 1 to 4 captions each, the
    captions of one image scattered through the file as in COCO's caption list."""
    rng = random.Random(7)
    (folder / "img").mkdir(parents=True)
    records = []
    for k in range(N_IMAGES):
        Image.new("RGB", (8, 8), (20 * k, 100, 200 - 10 * k)).save(folder / "img" / f"{k}.png")
        records += [(f"img/{k}.png", f"caption {c} of image {k}") for c in range(rng.randint(1, 4))]
    rng.shuffle(records)
    return records


def minicpm_file(folder: Path, records: list[tuple[str, str]]) -> Path:
    path = folder / "all.json"
    path.write_text(json.dumps([{"image": image, "conversations": [
        {"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": text}]}
        for image, text in records]), encoding="utf-8")
    return path


def images_of(samples: list[Sample]) -> set[bytes]:
    return {Path(s.images[0]).read_bytes() for s in samples}


def test_data_split_keeps_each_image_on_one_side(tmp_path, capsys):
    data = minicpm_file(tmp_path, coco_like(tmp_path))
    assert main(["data", "split", str(data), "--val", "0.25", "--seed", "3", "--out", str(tmp_path / "out")]) == 0
    assert "samples that share an image stay together: 9 image groups in train, 3 in val" in capsys.readouterr().out
    train, val = load_samples(tmp_path / "out" / "train.json"), load_samples(tmp_path / "out" / "val.json")
    assert not images_of(train) & images_of(val)
    assert len(images_of(val)) == 3  # a fraction of the images, rounded half up
    assert sorted(s.answer() for s in train + val) == sorted(s.answer() for s in load_samples(data))


def test_data_split_prepare_and_training_split_agree(tmp_path):
    records = coco_like(tmp_path)
    data = minicpm_file(tmp_path, records)
    source = tmp_path / "records.json"  # the same records as a dataset to prepare
    source.write_text(json.dumps([{"image": image, "text": text} for image, text in records]), encoding="utf-8")

    main(["data", "split", str(data), "--val", "0.25", "--seed", "5", "--out", str(tmp_path / "split")])
    by_split = [s.answer() for s in load_samples(tmp_path / "split" / "val.json")]
    prepare_command(out=str(tmp_path / "prepared"), local=str(source), image_column="image", text_column="text",
                    val="0.25", seed=5)
    by_prepare = [s.answer() for s in load_samples(tmp_path / "prepared" / "val.json")]
    # as `vlmtune train` splits data.train when data.val is not set: data.val_size=0.25, data.seed=5
    by_training = [s.answer() for s in split_samples(load_samples(data), 0.25, 5, what="data.val_size")[1]]

    assert by_split == by_prepare == by_training
    assert len({text.rsplit(" ", 1)[1] for text in by_split}) == 3  # 3 of the 12 images


def sample(images: list[str], text: str) -> Sample:
    return Sample(images, [Turn("user", "<image>" * len(images) + "q"), Turn("assistant", text)], source=f"x:{text}")


def test_groups_link_shared_images_and_keep_text_only_records_apart(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.png") for n in "abc")
    samples = [sample([a], "0"), sample([], "1"), sample([b, c], "2"), sample([c], "3"), sample([], "4"),
               sample([str(tmp_path / "x" / ".." / "a.png")], "5")]
    assert image_groups(samples) == [[0, 5], [1], [2, 3], [4]]
    for seed in range(10):
        train, val = split_samples(samples, 2, seed)
        assert val and len(train) + len(val) == 6
        assert {x for s in train for x in s.images}.isdisjoint(x for s in val for x in s.images)
    assert split_samples(samples, "2", 4) == split_samples(samples, 2.0, 4)  # "2", 2 and 2.0 are one count


def test_a_size_that_leaves_a_side_empty_names_the_image_groups(tmp_path):
    one_image = [sample([str(tmp_path / "a.png")], str(i)) for i in range(5)]
    with pytest.raises(VlmtuneError, match=r"cannot split 1 image group\(s\).*data\.val_size counts image groups: "
                                           r"these 5 samples have 1"):
        split_samples(one_image, 0.5, 0, what="data.val_size")
    with pytest.raises(VlmtuneError, match=r"--val 'lots' is not a count"):
        split_samples(one_image, "lots", 0)
