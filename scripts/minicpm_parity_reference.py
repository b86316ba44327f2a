"""The reference half of `minicpm_parity.py`: run the official remote code's forward on saved inputs.

    REFERENCE_PYTHON scripts/minicpm_parity_reference.py --reference DIR --arch ARCH --model M --inputs I --out O

Runs in the reference's Python (its old transformers). Builds the official model class from the tiny
config.json in M, loads M's safetensors strictly, turns the saved vlmtune-contract inputs into the
official `data` dict (per-row lists of slice images, `tgt_sizes`, `image_bound`, `position_ids`) and
saves the logits to O (safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minicpm_reference import CLASSES, load_classes, register_tiny_timm_tower  # noqa: E402


def runs(row: torch.Tensor) -> list[list[int]]:
    """[start, end) of each run of ones in a 0/1 row."""
    out, start = [], None
    for i, v in enumerate(row.tolist() + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append([start, i])
            start = None
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--arch", choices=sorted(CLASSES), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config_dict = json.loads((args.model / "config.json").read_text())
    if args.arch == "minicpmv2":
        register_tiny_timm_tower(config_dict["vision_encoder"], config_dict["vision_config"])
    config_cls, model_cls = load_classes(args.reference, args.arch)
    config = config_cls(**config_dict)
    config._attn_implementation = "eager"
    model = model_cls(config)
    state = {}
    for file in sorted(args.model.glob("*.safetensors")):
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(f"weights do not fit the reference model: missing {result.missing_keys[:10]}, "
                         f"unexpected {result.unexpected_keys[:10]}")
    model = model.float().eval()

    inputs = load_file(str(args.inputs))
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    mm, tgt_sizes, patches = inputs["mm_token_type_ids"], inputs["tgt_sizes"], inputs["pixel_values"]
    slices_per_row = inputs["slices_per_row"].tolist()
    p = config_dict["patch_size"]

    # Flat patches back to the official per-slice layouts.
    slice_images, offset = [], 0
    for h, w in tgt_sizes.tolist():
        piece = patches[offset: offset + h * w].view(h * w, 3, p, p)
        offset += h * w
        if args.arch == "minicpmv2":  # an image [3, h*p, w*p]
            slice_images.append(piece.view(h, w, 3, p, p).permute(2, 0, 3, 1, 4).reshape(3, h * p, w * p))
        else:  # reshape_by_patch: [3, p, h*w*p], patches side by side
            slice_images.append(piece.permute(1, 2, 0, 3).reshape(3, p, h * w * p))
    pixel_values, sizes, bounds, start = [], [], [], 0
    for i, n in enumerate(slices_per_row):
        pixel_values.append(slice_images[start: start + n])
        sizes.append(tgt_sizes[start: start + n].to(torch.int32))
        row_bounds = runs(mm[i])
        if len(row_bounds) != n:
            raise SystemExit(f"row {i}: {len(row_bounds)} runs of image positions for {n} slices")
        bounds.append(torch.tensor(row_bounds, dtype=torch.long).view(-1, 2))
        start += n
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids).contiguous()
    data = {"input_ids": input_ids, "pixel_values": pixel_values, "tgt_sizes": sizes, "image_bound": bounds,
            "image_bounds": bounds, "position_ids": position_ids}
    with torch.no_grad():
        logits = model(data, attention_mask=attention_mask).logits
    save_file({"logits": logits.float().contiguous()}, str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
