"""Dataset formats: the seed tutorials' exact shapes, path rules, errors, and round trips."""

from __future__ import annotations

import csv
import json
import os

import pytest
from PIL import Image

from vlmtune.data.formats import FORMATS, detect_format, load_samples, read_dataset, write_samples
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.errors import DataError


def png(path) -> str:
    """A real 4x4 PNG at `path`; returns its absolute path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return os.path.abspath(path)


def write_json(path, records) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    return str(path)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return str(path)


def shape(samples: list[Sample]) -> list[tuple]:
    """What must survive a conversion: images and (role, text) turns."""
    return [(s.images, [(t.role, t.text) for t in s.turns]) for s in samples]


# --- the seed tutorials' shapes ------------------------------------------------------------


def test_seed_002_qwen_bare_image_path(tmp_path):
    img = png(tmp_path / "LaTeX_OCR" / "0.jpg")
    path = write_json(tmp_path / "latex_ocr_train.json", [
        {"id": "identity_1", "conversations": [
            {"role": "user", "value": img},
            {"role": "assistant", "value": r"\frac{a}{b}"}]},
        {"id": "identity_2", "conversations": [
            {"role": "user", "value": "LaTeX_OCR/0.JPG"},
            {"role": "assistant", "value": "x^2"}]},
    ])
    samples, fmt = read_dataset(path)
    assert fmt == "qwen"
    assert samples[0] == Sample(images=[img], turns=[Turn("user", IMAGE), Turn("assistant", r"\frac{a}{b}")],
                                id="identity_1", source=f"{path}:0")
    assert samples[1].images == [str(tmp_path / "LaTeX_OCR" / "0.JPG")]
    assert samples[1].turns[0].text == IMAGE


def test_seed_002_bare_path_rule_needs_a_single_image_path(tmp_path):
    path = write_json(tmp_path / "d.json", [{"conversations": [
        {"role": "user", "value": "describe photo.jpg please"},
        {"role": "assistant", "value": "a.png"}]}])
    (sample,) = load_samples(path)
    assert sample.images == []
    assert sample.turns[0].text == "describe photo.jpg please"
    assert sample.turns[1].text == "a.png"  # only user turns are read as images


def test_seed_003_qwen_vision_tags(tmp_path):
    img = png(tmp_path / "coco_2014_caption" / "391895.jpg")
    path = write_json(tmp_path / "data_vl.json", [{"id": "identity_1", "conversations": [
        {"from": "user", "value": f"COCO Yes: <|vision_start|>{img}<|vision_end|>"},
        {"from": "assistant", "value": "A snow skier assessing the mountain before starting to sky"}]}])
    samples, fmt = read_dataset(path)
    assert fmt == "qwen"
    assert samples == [Sample(images=[img], id="identity_1", source=f"{path}:0", turns=[
        Turn("user", "COCO Yes: <image>"),
        Turn("assistant", "A snow skier assessing the mountain before starting to sky")])]


def test_seed_004_minicpm_single_image_multi_turn(tmp_path):
    img = png(tmp_path / "mllm_demo_data" / "1.jpg")
    path = write_json(tmp_path / "mllm_demo.json", [{
        "id": "0",
        "conversations": [
            {"content": "<image>\nWho are they?", "role": "user"},
            {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
            {"content": "What are they doing?", "role": "user"},
            {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
        "image": img}])
    samples, fmt = read_dataset(path)
    assert fmt == "minicpm"
    assert samples[0].images == [img]
    assert [(t.role, t.text) for t in samples[0].turns] == [
        ("user", "<image>\nWho are they?"),
        ("assistant", "They're Kane and Gretzka from Bayern Munich."),
        ("user", "What are they doing?"),
        ("assistant", "They are celebrating on the soccer field.")]
    assert samples[0].id == "0"
    assert samples[0].answer() == "They are celebrating on the soccer field."


def test_seed_004_minicpm_multi_image_dict_in_placeholder_order(tmp_path):
    paths = [png(tmp_path / "path" / "to" / f"image_{k}.jpg") for k in range(4)]
    path = write_json(tmp_path / "multi.json", [{
        "id": "0",
        "image": {f"<image_0{k}>": f"path/to/image_{k}.jpg" for k in range(4)},
        "conversations": [
            {"role": "user", "content": "How to create such text-only videos using CapCut?\n"
                                        "<image_02>\n<image_00>\n<image_01>\n<image_03>\n"},
            {"role": "assistant", "content": "To create a text-only video ..."}]}])
    (sample,) = load_samples(path)
    assert sample.images == [paths[2], paths[0], paths[1], paths[3]]
    assert sample.turns[0].text == ("How to create such text-only videos using CapCut?\n"
                                    "<image>\n<image>\n<image>\n<image>\n")
    assert sample.placeholder_count == len(sample.images)


def test_seed_000_minicpm_image_prompt(tmp_path):
    img = png(tmp_path / "LaTeX_OCR" / "998.jpg")
    path = write_json(tmp_path / "latex_ocr_train.json", [{
        "id": "identity_1", "image": "LaTeX_OCR/998.jpg",
        "conversations": [{"role": "user", "content": "<image>\n这张图对应的LaTex公式是什么？"},
                          {"role": "assistant", "content": r"\sum_{i=1}^n i"}]}])
    assert load_samples(path) == [Sample(
        images=[img], id="identity_1", source=f"{path}:0",
        turns=[Turn("user", "<image>\n这张图对应的LaTex公式是什么？"), Turn("assistant", r"\sum_{i=1}^n i")])]


def test_seed_csv_intermediate_files(tmp_path):
    img = png(tmp_path / "coco_2014_caption" / "1.jpg")
    path = tmp_path / "coco-2024-dataset.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption", "image_id"])
        w.writerow([img, "A man riding a horse", "1"])
        w.writerow(["coco_2014_caption/1.jpg", "Two dogs, one ball", "2"])
    samples, fmt = read_dataset(path)
    assert fmt == "csv"
    assert samples[0] == Sample(images=[img], turns=[Turn("user", IMAGE), Turn("assistant", "A man riding a horse")],
                                source=f"{path}:0", meta={"image_id": "1"})
    assert samples[1].images == [img]
    assert samples[1].answer() == "Two dogs, one ball"


def test_csv_column_names_are_picked_case_insensitively(tmp_path):
    path = tmp_path / "latex.csv"
    path.write_text("\ufeffFile_Name,LaTeX\nf.png,x+y\n", encoding="utf-8")  # with a BOM, as Excel saves
    (sample,) = load_samples(path)
    assert sample.images == [str(tmp_path / "f.png")]
    assert sample.answer() == "x+y"


def test_csv_without_a_text_column_names_the_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("image_path,description\na.png,hi\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:0: no text column \(columns: image_path, description\)"):
        load_samples(path)


# --- other reading rules --------------------------------------------------------------------


def test_json_and_jsonl_read_the_same(tmp_path):
    records = [
        {"id": "a", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    as_json = load_samples(write_json(tmp_path / "d.json", records))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n", encoding="utf-8")
    as_jsonl = load_samples(jsonl)
    assert shape(as_json) == shape(as_jsonl)
    assert [s.source for s in as_jsonl] == [f"{jsonl}:0", f"{jsonl}:1"]  # blank lines are not records
    # JSON Lines saved with a .json name is read too.
    misnamed = tmp_path / "lines.json"
    misnamed.write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    assert shape(load_samples(misnamed)) == shape(as_json)


def test_image_paths_resolve_against_the_data_file_folder(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    path = write_json(data_dir / "d.json", [{"image": ["imgs/a.png", "/abs/b.png", "https://x.org/c.png"],
                                              "conversations": [{"from": "human", "value": "<image><image><image>"},
                                                                {"from": "gpt", "value": "three"}]}])
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    (sample,) = load_samples(os.path.relpath(path, tmp_path))
    assert sample.images == [str(data_dir / "imgs" / "a.png"), "/abs/b.png", "https://x.org/c.png"]


@pytest.mark.parametrize("record", [
    {"image": "a.png", "conversations": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What?"},
                                         {"role": "assistant", "content": "A."}]},
    {"image": ["a.png"], "conversations": [{"from": "system", "value": "Be brief."},
                                           {"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]},
])
def test_images_without_placeholder_go_before_the_first_user_text(tmp_path, record):
    (sample,) = load_samples(write_json(tmp_path / "d.json", [record]))
    assert [(t.role, t.text) for t in sample.turns] == [
        ("system", "Be brief."), ("user", "<image>\nWhat?"), ("assistant", "A.")]
    assert sample.images == [str(tmp_path / "a.png")]


def test_no_placeholder_rule_puts_one_placeholder_per_image(tmp_path):
    path = write_json(tmp_path / "d.json", [{"image": {"<image_00>": "a.png", "<image_01>": "b.png"},
                                              "conversations": [{"role": "user", "content": "Same?"},
                                                                {"role": "assistant", "content": "No."}]}])
    (sample,) = load_samples(path)
    assert sample.turns[0].text == "<image>\n<image>\nSame?"
    assert sample.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_placeholder_image_mismatch_is_kept_for_the_check(tmp_path):
    path = write_json(tmp_path / "d.json", [{"image": "a.png", "conversations": [
        {"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "two?"}]}])
    (sample,) = load_samples(path)
    assert sample.placeholder_count == 2
    assert sample.images == [str(tmp_path / "a.png")]


def test_roles_are_normalised(tmp_path):
    path = write_json(tmp_path / "d.json", [{"conversations": [
        {"from": "System", "value": "s"}, {"from": "HUMAN", "value": "u"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "u2"}, {"from": "bot", "value": "a2"}, {"from": "human", "value": "u3"},
        {"from": "model", "value": "a3"}]}])
    (sample,) = load_samples(path)
    assert [t.role for t in sample.turns] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert sample.prompt_turns()[0] == Turn("system", "s")


def test_messages_inline_image_parts_and_image_url(tmp_path):
    path = write_json(tmp_path / "m.json", [{"id": 5, "messages": [
        {"role": "system", "content": "You read formulas."},
        {"role": "user", "content": [
            {"type": "image", "image": "p.jpg"},
            {"type": "text", "text": "\nand "},
            {"type": "image_url", "image_url": {"url": "https://example.com/q.png"}},
            {"type": "text", "text": " read them"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x=1"}]}]}])
    samples, fmt = read_dataset(path)
    assert fmt == "messages"
    assert samples == [Sample(
        images=[str(tmp_path / "p.jpg"), "https://example.com/q.png"], id="5", source=f"{path}:0",
        turns=[Turn("system", "You read formulas."), Turn("user", "<image>\nand <image> read them"),
               Turn("assistant", "x=1")])]


def test_messages_trl_layout_with_top_level_images(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"images": ["a.png", "b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Same."}]}]},
        {"images": ["c.png"], "messages": [
            {"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "C."}]},
    ])
    first, second = load_samples(path)
    assert first.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert first.turns[0].text == "<image>Compare with<image>"
    assert second.images == [str(tmp_path / "c.png")]
    assert [(t.role, t.text) for t in second.turns] == [("user", "<image>What is it?"), ("assistant", "C.")]


def test_extra_fields_are_kept_in_meta(tmp_path):
    path = write_json(tmp_path / "d.json", [{"id": "1", "image_id": 391895, "split": "train",
                                              "image": "a.png", "conversations": [
                                                  {"role": "user", "content": "<image>"},
                                                  {"role": "assistant", "content": "a"}]}])
    (sample,) = load_samples(path)
    assert sample.meta == {"image_id": 391895, "split": "train"}


@pytest.mark.parametrize("record, fmt", [
    ({"image": "a.png", "conversations": [{"role": "user", "content": "<image>"}]}, "minicpm"),
    ({"conversations": [{"role": "user", "content": "hi"}]}, "minicpm"),
    ({"conversations": [{"from": "user", "value": "<|vision_start|>a.png<|vision_end|>"}]}, "qwen"),
    ({"conversations": [{"role": "user", "value": "a.png"}]}, "qwen"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}, "llava"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "llava"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"image_path": "a.png", "text": "x"}, "csv"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt
    assert fmt in FORMATS


def test_detect_format_rejects_unknown_records():
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format({"question": "q", "answer": "a"})


def test_explicit_format_overrides_detection(tmp_path):
    # A qwen-only rule: with format="llava" a bare path stays text.
    path = write_json(tmp_path / "d.json", [{"conversations": [{"from": "user", "value": "a.png"},
                                                                {"from": "assistant", "value": "x"}]}])
    assert load_samples(path)[0].images == [str(tmp_path / "a.png")]
    assert load_samples(path, format="llava")[0].images == []


# --- structural errors name the file and the record ------------------------------------------

GOOD = {"image": "a.png", "conversations": [{"role": "user", "content": "<image>"},
                                            {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("bad, message", [
    ({"image": "a.png", "id": "x"}, "'conversations' is missing"),
    ({"image": "a.png", "conversations": []}, "'conversations' is empty"),
    ({"image": "a.png", "conversations": [{"content": "<image>"}]}, "turn 0 has no 'role'"),
    ({"image": "a.png", "conversations": [{"role": "user"}]}, "turn 0 has no text"),
    ({"image": "a.png", "conversations": [{"role": "user", "content": None}]}, "turn 0 has no text"),
    ({"image": "a.png", "conversations": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
     "turn 1 has unknown role 'tool'"),
    ({"image": 3, "conversations": [{"role": "user", "content": "q"}]}, "'image' is a int"),
    (["not", "a", "record"], "record is a list, not a JSON object"),
    ("just text", "record is a str, not a JSON object"),
])
def test_structural_errors_name_file_and_record(tmp_path, bad, message):
    path = write_json(tmp_path / "broken.json", [GOOD, bad])
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert f"broken.json:1: {message}" in str(info.value)
    assert " — " in str(info.value)  # and says what to do


def test_messages_errors_name_file_and_record(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_json(tmp_path / "m.json", [good, good, {"messages": [{"role": "user", "content": [
        {"type": "video", "video": "v.mp4"}]}]}])
    with pytest.raises(DataError, match=r"m\.json:2: message 0 has a content part of type 'video'"):
        load_samples(path)
    path = write_json(tmp_path / "m2.json", [good, {"conversations": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"m2\.json:1: 'messages' is missing"):
        load_samples(path)


def test_bad_jsonl_line_gives_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"image": "a.png", "conversations": [\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:1: invalid JSON on line 3"):
        load_samples(path)


def test_bad_json_file_gives_position(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": 1,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 2"):
        load_samples(path)


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_samples(tmp_path / "d.txt")
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "nope.json")
    with pytest.raises(DataError, match="unknown format 'sharegpt'"):
        load_samples(write_json(tmp_path / "d.json", [GOOD]), format="sharegpt")


# --- writing ---------------------------------------------------------------------------------


def test_written_shapes_match_the_seeds(tmp_path):
    one = png(tmp_path / "imgs" / "one.png")
    two = png(tmp_path / "imgs" / "two.png")
    samples = [Sample(images=[one], turns=[Turn("user", "COCO Yes: <image>"), Turn("assistant", "A dog.")],
                      meta={"image_id": 7}),
               Sample(images=[one, two], id="0", turns=[Turn("user", "Compare\n<image>\n<image>\n"),
                                                        Turn("assistant", "Same.")])]
    out = tmp_path / "out"
    records = {}
    for fmt in ("minicpm", "qwen", "messages", "llava"):
        write_samples(samples, out / f"{fmt}.json", fmt)
        records[fmt] = json.loads((out / f"{fmt}.json").read_text(encoding="utf-8"))
    assert records["minicpm"][0] == {"id": "identity_1", "image": "../imgs/one.png", "image_id": 7,
                                     "conversations": [{"role": "user", "content": "COCO Yes: <image>"},
                                                       {"role": "assistant", "content": "A dog."}]}
    assert records["minicpm"][1]["image"] == {"<image_00>": "../imgs/one.png", "<image_01>": "../imgs/two.png"}
    assert records["minicpm"][1]["conversations"][0]["content"] == "Compare\n<image_00>\n<image_01>\n"
    assert records["qwen"][0]["conversations"] == [
        {"from": "user", "value": "COCO Yes: <|vision_start|>../imgs/one.png<|vision_end|>"},
        {"from": "assistant", "value": "A dog."}]
    assert records["messages"][1]["messages"][0]["content"] == [
        {"type": "text", "text": "Compare\n"}, {"type": "image", "image": "../imgs/one.png"},
        {"type": "text", "text": "\n"}, {"type": "image", "image": "../imgs/two.png"}, {"type": "text", "text": "\n"}]
    assert records["llava"][1]["image"] == ["../imgs/one.png", "../imgs/two.png"]
    assert records["llava"][0]["conversations"][0] == {"from": "human", "value": "COCO Yes: <image>"}


def test_absolute_paths_and_urls(tmp_path):
    img = png(tmp_path / "a.png")
    samples = [Sample(images=[img, "https://x.org/b.png"], turns=[Turn("user", "<image><image>"),
                                                                  Turn("assistant", "ok")])]
    write_samples(samples, tmp_path / "o" / "d.json", "llava", absolute_paths=True)
    (record,) = json.loads((tmp_path / "o" / "d.json").read_text())
    assert record["image"] == [img, "https://x.org/b.png"]


def test_csv_writer_drops_prompts_with_a_count(tmp_path, capsys):
    img = png(tmp_path / "a.png")
    samples = [Sample(images=[img], turns=[Turn("user", IMAGE), Turn("assistant", "x")], id="k"),
               Sample(images=[img], turns=[Turn("user", "<image>\nRead it."), Turn("assistant", "y")])]
    path = tmp_path / "out" / "d.csv"
    write_samples(samples, path, "csv")
    assert "dropped the user prompt of 1 of 2 samples" in capsys.readouterr().err
    with open(path, newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == [{"id": "k", "image_path": "../a.png", "text": "x"},
                                           {"id": "identity_2", "image_path": "../a.png", "text": "y"}]


def test_empty_dataset_writes_a_readable_file(tmp_path):
    for name, fmt in (("d.csv", "csv"), ("d.json", "qwen"), ("d.jsonl", "messages")):
        write_samples([], tmp_path / name, fmt)
        assert load_samples(tmp_path / name, allow_empty=True) == []
    assert (tmp_path / "d.csv").read_text(encoding="utf-8") == "id,image_path,text\n"


def test_csv_writer_refuses_what_it_cannot_hold_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("old", encoding="utf-8")
    good = Sample(images=["/a.png"], turns=[Turn("user", IMAGE), Turn("assistant", "x")], source="in.json:0")
    bad = Sample(images=["/a.png", "/b.png"], turns=[Turn("user", "<image><image>"), Turn("assistant", "x")],
                 source="in.json:1")
    with pytest.raises(DataError, match=r"in\.json:1: cannot be written as csv: it has 2 images .* JSON format"):
        write_samples([good, bad, bad], path, "csv")
    multi_turn = Sample(images=["/a.png"], turns=[Turn("user", IMAGE), Turn("assistant", "x"),
                                                  Turn("user", "more"), Turn("assistant", "y")], source="in.json:7")
    with pytest.raises(DataError, match=r"in\.json:7: .*user/assistant/user/assistant"):
        write_samples([multi_turn], path, "csv")
    assert path.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["d.csv"]  # no temporary file left behind
    with pytest.raises(DataError, match="holds only the csv format"):
        write_samples([good], path, "qwen")


def test_positional_formats_refuse_images_without_placeholders(tmp_path):
    sample = Sample(images=["/a.png", "/b.png"], turns=[Turn("user", "<image> only one"), Turn("assistant", "x")],
                    source="in.json:3")
    for fmt in ("qwen", "messages"):
        with pytest.raises(DataError, match=rf"in\.json:3: 2 images but 1 <image> placeholders — the {fmt}"):
            write_samples([sample], tmp_path / "d.json", fmt)
    assert not os.listdir(tmp_path)


# --- round trips -----------------------------------------------------------------------------

JSON_FORMATS = ("minicpm", "qwen", "messages", "llava")


@pytest.fixture
def images(tmp_path):
    return [png(tmp_path / "src" / "imgs" / f"{k}.png") for k in range(3)]


def rich_samples(images):
    return [
        Sample(images=[images[0]], turns=[Turn("user", "<image>\nWhich formula is this?"),
                                          Turn("assistant", r"E = mc^2")], id="one", meta={"image_id": 11}),
        Sample(images=[images[1], images[2]], turns=[
            Turn("system", "You compare pictures."), Turn("user", "First <image> then\n<image>: same?"),
            Turn("assistant", "No."), Turn("user", "Why?"), Turn("assistant", "Colours differ.")]),
        Sample(images=[], turns=[Turn("user", "No picture here."), Turn("assistant", "Fine.")]),
        Sample(images=["https://example.com/x.png"], turns=[Turn("user", "COCO Yes: <image>"),
                                                            Turn("assistant", "A web image.")]),
    ]


def csv_samples(images):
    return [Sample(images=[img], turns=[Turn("user", IMAGE), Turn("assistant", f"caption {k}, with comma")])
            for k, img in enumerate(images)]


@pytest.mark.parametrize("a", FORMATS)
@pytest.mark.parametrize("b", FORMATS)
def test_round_trip_between_formats_and_folders(tmp_path, images, a, b):
    samples = csv_samples(images) if "csv" in (a, b) else rich_samples(images)
    ext = {a: ".csv" if a == "csv" else ".json", b: ".csv" if b == "csv" else ".jsonl"}
    first = tmp_path / "src" / f"data{ext[a]}"
    write_samples(samples, first, a)
    read_a = load_samples(first)
    assert shape(read_a) == shape(samples)

    second = tmp_path / "elsewhere" / "deeper" / f"data{ext[b]}"
    write_samples(read_a, second, b)
    read_b = load_samples(second)
    assert shape(read_b) == shape(samples)
    assert all(os.path.isfile(p) for s in read_b for p in s.images if not p.startswith("https://"))

    back = tmp_path / "back" / f"again{ext[a]}"
    write_samples(read_b, back, a)
    assert shape(load_samples(back)) == shape(samples)
    if "csv" not in (a, b):
        assert [s.meta for s in load_samples(back)] == [s.meta for s in samples]
