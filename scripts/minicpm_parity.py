"""Compare vlmtune's MiniCPM-V logits with the official remote code's, on a tiny model with shared weights.

    .venv/bin/python scripts/minicpm_parity.py --reference ~/MiniCPM-V-2_6 --reference-python /tmp/refvenv/bin/python

--reference is a folder with the official remote-code .py files (the hub checkpoint folder works: only its
.py files are used); the architecture is guessed from them (modeling_minicpmo.py: MiniCPM-o 2.6,
modeling_minicpm.py: MiniCPM-V 2.0, else 2.6) or given with --arch. --reference-python is a Python with
what that code needs: transformers 4.44 (4.36+ for 2.0), torch, timm 0.9 for 2.0, numpy, safetensors.

The script builds a tiny config of the architecture (hidden 128 so that the official `hidden // 128`
resampler heads is 1), random weights saved once as safetensors, and inputs in vlmtune's contract: two
rows (one right-padded), five slices with square and non-square patch grids, the image positions
marked in mm_token_type_ids. The reference runs in a subprocess (scripts/minicpm_parity_reference.py)
on the same weights and inputs converted to its own format; vlmtune loads the folder with
`MiniCPMVForConditionalGeneration.from_pretrained`. Both run in float32 with eager attention. Printed:
the largest |logit difference| over real (unpadded) positions, and the largest |logit| for scale.
Not a test: the reference code is not shipped with vlmtune.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from minicpm_reference import CLASSES, guess_arch  # noqa: E402

from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration  # noqa: E402
from vlmtune.models.minicpmv.tiny import build_tiny_minicpm_model, tiny_minicpm_config  # noqa: E402

SLICES = [[(4, 4), (3, 5)], [(10, 10), (6, 2), (7, 9)]]  # patch grids of each row's slices


def make_inputs(config: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, p, vocab = config["query_num"], config["patch_size"], config["vocab_size"]
    rows, masks = [], []
    for row_slices in SLICES:
        ids, mm = [], []
        for _ in row_slices:
            text = torch.randint(3, vocab, (3,), generator=gen).tolist()
            ids += text + [0] * q
            mm += [0] * len(text) + [1] * q
        ids += torch.randint(3, vocab, (5,), generator=gen).tolist()
        mm += [0] * 5
        rows.append(ids)
        masks.append(mm)
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    mm_token_type_ids = torch.zeros_like(input_ids)
    for i, (ids, mm) in enumerate(zip(rows, masks)):  # right padding, as the official collator pads
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        mm_token_type_ids[i, : len(mm)] = torch.tensor(mm)
    sizes = [s for row in SLICES for s in row]
    n_patches = sum(h * w for h, w in sizes)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.randn(n_patches, 3 * p * p, generator=gen),
            "tgt_sizes": torch.tensor(sizes, dtype=torch.long),
            "slices_per_row": torch.tensor([len(r) for r in SLICES])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="folder with the official remote-code .py files")
    parser.add_argument("--reference-python", required=True, help="Python with the reference's transformers")
    parser.add_argument("--arch", choices=sorted(CLASSES), help="default: guessed from the reference's files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep the tiny model, inputs and logits here")
    args = parser.parse_args()
    arch = args.arch or guess_arch(args.reference)

    work = args.work or Path(tempfile.mkdtemp(prefix="minicpm_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    config = tiny_minicpm_config(arch, vocab_size=300, hidden=128, heads=4, kv_heads=2, vision_dim=32,
                                 vision_heads=2, query_num=4, vision_image_size=140)
    model = build_tiny_minicpm_model(config, seed=args.seed)
    with torch.no_grad():  # move every weight off its init (norms at 1/0, zero biases) so swaps would show
        gen = torch.Generator().manual_seed(args.seed + 1)
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(work / "model")
    inputs = make_inputs(config, args.seed)
    save_file(inputs, str(work / "inputs.safetensors"))

    cmd = [args.reference_python, str(HERE / "minicpm_parity_reference.py"), "--reference", str(args.reference),
           "--arch", arch, "--model", str(work / "model"), "--inputs", str(work / "inputs.safetensors"),
           "--out", str(work / "reference_logits.safetensors")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        print(f"{arch}: the reference failed to run (exit {done.returncode}); see its output above")
        return 1
    reference = load_file(str(work / "reference_logits.safetensors"))["logits"]

    ours = MiniCPMVForConditionalGeneration.from_pretrained(work / "model", attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs["pixel_values"], tgt_sizes=inputs["tgt_sizes"],
                      mm_token_type_ids=inputs["mm_token_type_ids"]).logits.float()
    real = inputs["attention_mask"].bool()
    diff = (logits[real] - reference[real]).abs().max().item()
    print(f"{arch}: max |logit difference| {diff:.3e} over {int(real.sum())} positions "
          f"(max |logit| {reference[real].abs().max().item():.3f}); work folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
