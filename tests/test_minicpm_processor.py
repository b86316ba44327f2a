"""MiniCPM-V 2.0 / 2.6 / MiniCPM-o 2.6 processing on the real tiny processors: slicing grids computed
by hand from the official algorithm, placeholder layouts and prompts written out by hand from the
official code, the pixel layout agreed with the model, Encoder masking, and loading a folder laid
out like the published ones without running its remote code.

Where each expected value comes from:
- slicing: `get_sliced_grid` / `find_best_resize` / `get_refine_size` of the official
  `image_processing_minicpmv.py` (2.6, o-2.6) and `slice_image` of MiniCPM-V 2.0's
  `modeling_minicpmv.py` (the same arithmetic);
- 2.6 / o-2.6 placeholders: `get_slice_image_placeholder` and `get_grid_placeholder` of the official
  image processor (image id, then `<image>` + unk*Q + `</image>`, then rows of `<slice>` + unk*Q +
  `</slice>` joined by "\\n"), numbered per prompt by `processing_minicpmv.py`;
- 2.0 placeholders: `get_slice_image_placeholder` / `get_grid_placeholder` of 2.0's modeling file
  (`<slice>` wrapping rows of `<image>` + unk*Q + `</image>` cells);
- prompts: `chat()` of each version (content items joined by "\\n", image first; 2.6 through the
  tokenizer's ChatML template; 2.0 `<s><用户>...<AI>`).
The tiny processors use query_num Q = 4, patch 14, scale_resolution 28, max_slice_nums 4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import trained_runs, write_json
from vlmtune.data.encode import IGNORE_INDEX, Encoder
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import Sample, Turn
from vlmtune.errors import VlmtuneError
from vlmtune.models.family import Family
from vlmtune.models.minicpmv.image_processing import (MiniCPMVImageProcessor, best_grid, find_best_resize,
                                                      get_refine_size)
from vlmtune.models.minicpmv.processing import load_minicpm_processor
from vlmtune.models.minicpmv.tiny_tokenizer import build_tiny_processor

U4 = "<unk>" * 4  # the query placeholders of one slice (Q = 4)
SYSTEM_26 = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def processors():
    return {v: build_tiny_processor(v) for v in ("minicpmv2", "minicpmv2_6", "minicpmo2_6")}


def family(version: str) -> Family:
    """The Family the MiniCPM-V families will register (a proposal; see the report)."""
    return Family(name=version, vision=("vpm.",), projector=("resampler.",), language_model=("llm.",),
                  lora_targets=r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
                  end_of_turn="</s>" if version == "minicpmv2" else "<|im_end|>")


def ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def check_contract(enc: dict, q: int = 4, p: int = 14) -> None:
    """The invariants the model relies on."""
    tgt = enc["tgt_sizes"]
    assert enc["pixel_values"].dtype == torch.float32 and enc["pixel_values"].shape[1] == 3 * p * p
    assert tgt.dtype == torch.long and tgt.shape[1] == 2
    assert int((tgt[:, 0] * tgt[:, 1]).sum()) == enc["pixel_values"].shape[0]
    mm = enc["mm_token_type_ids"]
    assert int(mm.sum()) == tgt.shape[0] * q
    assert mm.shape == enc["input_ids"].shape


# -- slicing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, grid", [
    ((448, 448), None),  # ratio 1 -> multiple 1: not sliced
    ((100, 50), None),  # smaller than one slice: not sliced (upscaled instead)
    ((1000, 500), (2, 1)),  # ratio 2.49 -> multiple 3; candidates 2,3,4; [2,1] has log error 0
    ((300, 1200), (1, 3)),  # ratio 1.79 -> multiple 2; candidates 2,3; log(1/4): [1,3] err .288 < [1,2] .693
    ((1344, 1344), (3, 3)),  # ratio 9 -> multiple 9; candidates 8,9; [3,3] exact
    ((600, 600), (1, 2)),  # ratio 1.79 -> 2; [1,2] and [2,1] tie exactly (|log 1/2| == |log 2|): first found wins
    # ratio 6.59 -> 7; candidates 6,7,8; [2,3] vs [3,2]: in floats |log(2/3)| is one ulp above |log(3/2)|
    ((1150, 1150), (3, 2)),
    ((4000, 100), (3, 1)),  # ratio 1.99 -> 2; candidates 2,3; log 40 = 3.69: [3,1] err 2.59 is closest
    ((4000, 4000), (3, 3)),  # multiple capped at max_slice_nums 9; 10 excluded
])
def test_grid_choice_matches_the_official_algorithm(size, grid):
    assert best_grid(size, scale_resolution=448, max_slice_nums=9) == grid


def test_resize_sizes_match_the_official_arithmetic():
    # 1000x500 overview: h = int(448/sqrt(2)) = 316, w = int(316*2) = 632 -> round to 14: 630 x 322
    assert find_best_resize((1000, 500), 448, 14) == (630, 322)
    # not upscaled unless asked: 100x50 only rounds (100 -> 98, 50 -> 56)
    assert find_best_resize((100, 50), 448, 14) == (98, 56)
    assert find_best_resize((100, 50), 448, 14, allow_upscale=True) == (630, 322)
    # 1000x500 in a 2x1 grid: cells 500x500 -> upscaled to 448x448 -> 896x448
    assert get_refine_size((1000, 500), (2, 1), 448, 14) == (896, 448)
    # round() halves to even as in the official code: 35/14 = 2.5 -> 2 patches
    assert find_best_resize((35, 35), 448, 14) == (28, 28)


def test_real_size_settings_give_the_official_slices():
    ip = MiniCPMVImageProcessor(max_slice_nums=9, scale_resolution=448, patch_size=14, image_feature_size=64,
                                use_image_id=True, version=2.6)
    out = ip([Image.new("RGB", (1000, 500), "gray")])
    # overview 630x322 -> 23x45 patches; two 448x448 cells -> 32x32 each
    assert out["tgt_sizes"].tolist() == [[23, 45], [32, 32], [32, 32]]
    assert out["pixel_values"].shape == (23 * 45 + 2 * 32 * 32, 3 * 14 * 14)
    assert out["grids"] == [(2, 1)]


def test_pixel_layout_patches_row_major_flattened_channel_row_col():
    ip = MiniCPMVImageProcessor(max_slice_nums=4, scale_resolution=28, patch_size=14, image_feature_size=4)
    # 28x28 is not sliced and not resized: 2x2 patches; each quadrant its own colour
    image = Image.new("RGB", (28, 28))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # top-left, top-right, bottom-left, ...
    for k, colour in enumerate(colours):
        image.paste(colour, ((k % 2) * 14, (k // 2) * 14, (k % 2) * 14 + 14, (k // 2) * 14 + 14))
    out = ip([image])
    assert out["tgt_sizes"].tolist() == [[2, 2]]
    pixels = out["pixel_values"].reshape(4, 3, 14, 14)
    for k, colour in enumerate(colours):
        expected = torch.tensor([c / 255 * 2 - 1 for c in colour]).view(3, 1, 1).expand(3, 14, 14)
        assert torch.allclose(pixels[k], expected), k
    # within a patch: row-major rows then columns; a gradient along x shows up in the last axis
    ramp = Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)).astype(np.uint8)).convert("RGB")
    first = ip([ramp])["pixel_values"][0].reshape(3, 14, 14)
    assert torch.allclose(first[0, 0], torch.tensor([x * 9 / 255 * 2 - 1 for x in range(14)]), atol=1e-6)


def test_slices_are_bicubic_resizes_cut_row_by_row():
    ip = MiniCPMVImageProcessor(max_slice_nums=4, scale_resolution=28, patch_size=14, image_feature_size=4)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (28, 56, 3), dtype=np.uint8))  # 56 wide, 28 high
    out = ip([image])
    # ratio 2 -> grid 2x1; overview: h = int(28/sqrt 2) = 19, w = 38 -> 42x14; cells 28x28 from a 56x28 resize
    assert out["grids"] == [(2, 1)]
    assert out["tgt_sizes"].tolist() == [[1, 3], [2, 2], [2, 2]]

    def unpatch(flat: torch.Tensor, rows: int, cols: int) -> np.ndarray:
        x = flat.reshape(rows, cols, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, rows * 14, cols * 14)
        return ((x.permute(1, 2, 0).numpy() + 1) / 2 * 255)

    overview = np.asarray(image.resize((42, 14), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.allclose(unpatch(out["pixel_values"][:3], 1, 3), overview, atol=1e-3)
    refined = np.asarray(image.resize((56, 28), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.allclose(unpatch(out["pixel_values"][3:7], 2, 2), refined[:, :28], atol=1e-3)  # left cell first
    assert np.allclose(unpatch(out["pixel_values"][7:11], 2, 2), refined[:, 28:], atol=1e-3)


# -- placeholders and prompts ---------------------------------------------------------------------
def run(processor, messages, images, add_generation_prompt=False):
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return text, processor(text=[text], images=images)


def user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


@pytest.mark.parametrize("variant", ["minicpmv2_6", "minicpmo2_6"])
def test_26_single_image_prompt(processors, variant):
    p = processors[variant]
    text, enc = run(p, [user(None, "What is in the image?")], [Image.new("RGB", (28, 28))], True)
    # chat(): [image, question] -> "(<image>./</image>)\nquestion"; the template adds the default system turn
    assert text == (SYSTEM_26 + "<|im_start|>user\n<image_id>0</image_id>(<image>./</image>)\nWhat is in the image?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    expected = (SYSTEM_26 + f"<|im_start|>user\n<image_id>0</image_id><image>{U4}</image>\nWhat is in the image?"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert enc["input_ids"][0].tolist() == ids(p, expected)
    unk = p.tokenizer.convert_tokens_to_ids("<unk>")
    assert enc["mm_token_type_ids"][0].tolist() == [int(t == unk) for t in ids(p, expected)]
    assert enc["tgt_sizes"].tolist() == [[2, 2]]
    check_contract(enc)


def test_26_sliced_image_layout(processors):
    p = processors["minicpmv2_6"]
    # 112x112 -> 2x2 grid: overview, then two rows of two <slice> cells joined by "\n", no wrapper
    _, enc = run(p, [user(None, "Q")], [Image.new("RGB", (112, 112))], True)
    expected = (SYSTEM_26 + f"<|im_start|>user\n<image_id>0</image_id><image>{U4}</image>"
                f"<slice>{U4}</slice><slice>{U4}</slice>\n<slice>{U4}</slice><slice>{U4}</slice>"
                "\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert enc["input_ids"][0].tolist() == ids(p, expected)
    assert enc["tgt_sizes"].tolist() == [[2, 2]] * 5
    check_contract(enc)
    # 28 wide, 56 high -> grid (cols 1, rows 2): two rows of one cell
    _, tall = run(p, [user(None, "Q")], [Image.new("RGB", (28, 56))], True)
    expected = (SYSTEM_26 + f"<|im_start|>user\n<image_id>0</image_id><image>{U4}</image>"
                f"<slice>{U4}</slice>\n<slice>{U4}</slice>\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert tall["input_ids"][0].tolist() == ids(p, expected)
    # overview 14 wide x 42 high = 3x1 patches (rows, cols); cells 28x28
    assert tall["tgt_sizes"].tolist() == [[3, 1], [2, 2], [2, 2]]


def test_20_sliced_image_prompt(processors):
    p = processors["minicpmv2"]
    text, enc = run(p, [user(None, "What is in the image?")], [Image.new("RGB", (112, 112))], True)
    # chat() of 2.0: "<用户>" + placeholder + "\n" + question + "<AI>", after the tokenizer's <s>
    assert text == "<s><用户>(<image>./</image>)\nWhat is in the image?<AI>"
    expected = (f"<s><用户><image>{U4}</image><slice><image>{U4}</image><image>{U4}</image>\n"
                f"<image>{U4}</image><image>{U4}</image></slice>\nWhat is in the image?<AI>")
    assert enc["input_ids"][0].tolist() == ids(p, expected)
    assert enc["input_ids"][0, 0] == p.tokenizer.convert_tokens_to_ids("<s>") == 1
    check_contract(enc)


def test_20_multi_turn_prompt_and_masking(processors, tmp_path):
    p = processors["minicpmv2"]
    sample = Sample(images=[png(tmp_path, "a.png", (28, 28))], source="t:0", turns=[
        Turn("user", "<image>\nHow many?"), Turn("assistant", "three"),
        Turn("user", "Which colour?"), Turn("assistant", "red")])
    encoder = Encoder(p, family("minicpmv2"))
    enc = encoder.encode(sample)
    # every answer ends with </s> (vlmtune's deliberate difference: see chat_format.py)
    expected = f"<s><用户><image>{U4}</image>\nHow many?<AI>three</s><用户>Which colour?<AI>red</s>"
    assert enc["input_ids"].tolist() == ids(p, expected)
    eos = p.tokenizer.convert_tokens_to_ids("</s>")
    assert trained_runs(enc["labels"]) == [ids(p, "three") + [eos], ids(p, "red") + [eos]]
    check_contract({k: v[None] if k in ("input_ids", "mm_token_type_ids") else v for k, v in enc.items()})
    # the generation prompt of the last turn is chat()'s (history as vlmtune trains it)
    prompt = encoder.encode_prompt(sample)
    assert prompt["input_ids"].tolist() == ids(p, f"<s><用户><image>{U4}</image>\nHow many?<AI>three</s>"
                                                  "<用户>Which colour?<AI>")


def test_20_rejects_a_system_turn(processors):
    with pytest.raises(VlmtuneError, match="no system turn"):
        processors["minicpmv2"].apply_chat_template([{"role": "system", "content": "x"}, user("hi")])


def png(folder: Path, name: str, size: tuple[int, int], colour: str = "red") -> str:
    path = folder / name
    Image.new("RGB", size, colour).save(path)
    return str(path)


def test_26_multi_image_seed_004_record(processors, tmp_path):
    p = processors["minicpmv2_6"]
    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    Image.new("RGB", (56, 28), "blue").save(tmp_path / "b.png")
    path = write_json(tmp_path / "train.json", [{
        "id": "0", "image": {"<image_00>": "a.png", "<image_01>": "b.png"},
        "conversations": [{"role": "user", "content": "How to create such text-only videos?\n<image_00>\n<image_01>\n"},
                          {"role": "assistant", "content": "Use CapCut."}]}])
    (sample,) = load_samples(path)
    enc = Encoder(p, family("minicpmv2_6")).encode(sample)
    # images numbered in prompt order; the second (56x28) sliced into a 2x1 grid; no newline doubled
    expected = (SYSTEM_26 + "<|im_start|>user\nHow to create such text-only videos?\n"
                f"<image_id>0</image_id><image>{U4}</image>\n"
                f"<image_id>1</image_id><image>{U4}</image><slice>{U4}</slice><slice>{U4}</slice>\n"
                "<|im_end|>\n<|im_start|>assistant\nUse CapCut.<|im_end|>\n")
    assert enc["input_ids"].tolist() == ids(p, expected)
    im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained_runs(enc["labels"]) == [ids(p, "Use CapCut.") + [im_end]]
    assert enc["tgt_sizes"].tolist() == [[2, 2], [1, 3], [2, 2], [2, 2]]
    assert int(enc["mm_token_type_ids"].sum()) == 4 * 4


def test_26_multi_turn_images_in_two_turns_keep_one_numbering(processors, tmp_path):
    p = processors["minicpmv2_6"]
    sample = Sample(images=[png(tmp_path, "a.png", (28, 28)), png(tmp_path, "b.png", (28, 28), "blue")], source="t:0",
                    turns=[
        Turn("system", "You describe pictures."), Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a red one"),
        Turn("user", "And this? <image>"), Turn("assistant", "a blue one")])
    encoder = Encoder(p, family("minicpmv2_6"))
    enc = encoder.encode(sample)
    # chat() numbers the images of a prompt 0, 1, ... even though the Encoder processes turn by turn
    expected = ("<|im_start|>system\nYou describe pictures.<|im_end|>\n"
                f"<|im_start|>user\n<image_id>0</image_id><image>{U4}</image>\nWhat is it?<|im_end|>\n"
                "<|im_start|>assistant\na red one<|im_end|>\n"
                f"<|im_start|>user\nAnd this? \n<image_id>1</image_id><image>{U4}</image><|im_end|>\n"
                "<|im_start|>assistant\na blue one<|im_end|>\n")
    assert enc["input_ids"].tolist() == ids(p, expected)
    im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained_runs(enc["labels"]) == [ids(p, "a red one") + [im_end], ids(p, "a blue one") + [im_end]]
    trained = enc["labels"] != IGNORE_INDEX
    assert torch.equal(enc["labels"][trained], enc["input_ids"][trained])
    assert not trained[enc["mm_token_type_ids"].bool()].any()  # image tokens never trained
    # the whole conversation in one processor call gives the same tokens and pixels
    text = p.apply_chat_template(encoder.messages(sample))
    whole = p(text=[text], images=[Image.open(f).convert("RGB") for f in sample.images])
    assert torch.equal(whole["input_ids"][0], enc["input_ids"])
    assert torch.equal(whole["mm_token_type_ids"][0], enc["mm_token_type_ids"])
    assert torch.equal(whole["pixel_values"], enc["pixel_values"])


def test_processor_call_numbers_bare_tags_like_the_official_processor(processors):
    p = processors["minicpmv2_6"]
    text = "<|im_start|>user\n(<image>./</image>)\n(<image>./</image>)\nQ<|im_end|>\n"
    enc = p(text=[text], images=[Image.new("RGB", (28, 28))] * 2)
    expected = (f"<|im_start|>user\n<image_id>0</image_id><image>{U4}</image>\n"
                f"<image_id>1</image_id><image>{U4}</image>\nQ<|im_end|>\n")
    assert enc["input_ids"][0].tolist() == ids(p, expected)


def test_processor_rejects_mismatched_images_and_literal_image_tokens(processors):
    p = processors["minicpmv2_6"]
    with pytest.raises(VlmtuneError, match="1 image"):
        p(text=["no tag here"], images=[Image.new("RGB", (28, 28))])
    with pytest.raises(VlmtuneError, match="image start token"):
        p(text=["a literal <image> token"], images=[])


def test_batch_padding(processors):
    p = processors["minicpmv2_6"]
    enc = p(text=["(<image>./</image>)short", "(<image>./</image>) a much longer text here"],
            images=[Image.new("RGB", (28, 28))] * 2, padding_side="left")
    assert enc["input_ids"].shape[0] == 2
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][1].all()
    assert enc["mm_token_type_ids"].sum(1).tolist() == [4, 4]
    check_contract(enc)


# -- folders --------------------------------------------------------------------------------------
OFFICIAL_CONFIGS = {
    "minicpmv2": {"model_type": "minicpmv", "vision_encoder": "vit_so400m_patch14_siglip_384.webli", "scale_emb": 12,
                  "query_num": 4, "max_slice_nums": 4, "scale_resolution": 28, "patch_size": 14, "slice_mode": True,
                  "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
    "minicpmv2_6": {"model_type": "minicpmv", "version": 2.6, "query_num": 4, "use_image_id": True, "slice_mode": True,
                    "patch_size": 14, "slice_config": {"max_slice_nums": 4, "patch_size": 14, "scale_resolution": 28,
                                                       "model_type": "minicpmv"},
                    "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
    "minicpmo2_6": {"model_type": "minicpmo", "version": 2.6, "query_num": 4, "use_image_id": True, "slice_mode": True,
                    "patch_size": 14, "slice_config": {"max_slice_nums": 4, "patch_size": 14, "scale_resolution": 28,
                                                       "model_type": "minicpmv"},
                    "auto_map": {"AutoModel": "modeling_minicpmo.MiniCPMO"}},
}
REMOTE_FILES = ("processing_minicpmv.py", "image_processing_minicpmv.py", "tokenization_minicpmv.py",
                "tokenization_minicpmv_fast.py", "processing_minicpmo.py", "tokenization_minicpmo_fast.py",
                "modeling_minicpmv.py", "modeling_minicpmo.py")


def official_folder(processor, variant, folder):
    """`processor` saved like the published checkpoint, remote code included as files that raise on import."""
    processor.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIGS[variant]))
    for name in REMOTE_FILES:
        (folder / name).write_text("raise RuntimeError('remote code was executed')\n")
    return folder


@pytest.fixture
def private_modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache before importing it: use a temporary one."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


@pytest.mark.parametrize("variant", ["minicpmv2", "minicpmv2_6", "minicpmo2_6"])
def test_loads_an_official_layout_without_running_its_remote_code(processors, variant, tmp_path,
                                                                  private_modules_cache):
    original = processors[variant]
    folder = official_folder(original, variant, tmp_path / variant)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" in pre and "auto_map" in tok_config and tok_config["chat_template"] == original.chat_template
    assert not (folder / "chat_template.jinja").exists()  # the official folders keep the template in the config

    before = set(sys.modules)
    loaded = load_minicpm_processor(folder)
    assert not [m for m in set(sys.modules) - before if "minicpm" in m.split(".")[-1] or "transformers_modules" in m]
    assert loaded.version == original.version and loaded.image_processor.to_dict() == original.image_processor.to_dict()
    messages = [user(None, "What is in the image?"), {"role": "assistant", "content": "a red circle"}]
    image = Image.new("RGB", (112, 56), "red")
    a = original(text=[original.apply_chat_template(messages)], images=[image])
    b = loaded(text=[loaded.apply_chat_template(messages)], images=[image])
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # the trap is real: transformers' own loader with remote code enabled does execute those files
    from transformers import AutoProcessor

    with pytest.raises(Exception, match="remote code was executed"):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def test_disagreeing_config_and_preprocessor_config_is_an_error(processors, tmp_path):
    folder = official_folder(processors["minicpmv2_6"], "minicpmv2_6", tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    config["query_num"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VlmtuneError, match="query_num=64.*image_feature_size=4"):
        load_minicpm_processor(folder)


def test_processor_only_folder_and_max_slice_override(processors, tmp_path):
    processors["minicpmv2_6"].save_pretrained(tmp_path / "ckpt")  # a LoRA checkpoint: no config.json
    loaded = load_minicpm_processor(tmp_path / "ckpt", max_slice_nums=1)
    assert loaded.version == 2.6 and loaded.image_processor.use_image_id
    enc = loaded(text=["(<image>./</image>)"], images=[Image.new("RGB", (112, 112))])
    assert enc["tgt_sizes"].tolist() == [[2, 2]]  # multiple capped at 1: not sliced


def test_folder_errors(tmp_path):
    with pytest.raises(VlmtuneError, match="no tokenizer.json or tokenizer.model"):
        load_minicpm_processor(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(VlmtuneError, match="install sentencepiece"):
            load_minicpm_processor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minicpmv", "version": 2.5}))
    with pytest.raises(VlmtuneError, match="version 2.5 is not supported"):
        load_minicpm_processor(tmp_path)



def test_collated_batch_keeps_the_contract(processors, tmp_path):
    from vlmtune.data.collate import Collator

    p = processors["minicpmv2_6"]
    samples = [Sample(images=[png(tmp_path, f"{i}.png", size)], source=f"t:{i}",
                      turns=[Turn("user", "<image>\nWhat?"), Turn("assistant", answer)])
               for i, (size, answer) in enumerate([((28, 28), "red"), ((112, 112), "a much longer answer")])]
    encoder = Encoder(p, family("minicpmv2_6"))
    items = [encoder.encode(s) for s in samples]
    batch = Collator(p.tokenizer.pad_token_id)(items)
    # 1 slice + 5 slices, in sample order; rows padded on the right with mm_token_type_ids 0
    assert batch["tgt_sizes"].tolist() == [[2, 2]] * 6
    assert batch["mm_token_type_ids"].sum(1).tolist() == [4, 20]
    assert batch["attention_mask"][0].sum() == len(items[0]["input_ids"])
    check_contract(batch)
