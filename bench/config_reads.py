"""How many times one `train()` opens the model's `config.json`, and from where.

    python bench/config_reads.py [--family qwen2_vl]

Builds a tiny model and a few caption records in a temporary folder, trains two LoRA steps
in this process, and counts every `open` of that model's config.json (a Python audit hook),
attributed to the innermost vlmtune function on the stack, or to the library that opened it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_vl")
    args = parser.parse_args()

    from vlmtune.config import load_config
    from vlmtune.data.synth import synth_command  # noqa: F401  (import cost outside the count)
    from vlmtune.models.tiny import build_tiny_model
    from vlmtune.train import train

    tmp = Path(tempfile.mkdtemp(prefix="config_reads_"))
    model = build_tiny_model(args.family, tmp / "model")
    target = str((model / "config.json").resolve())
    from PIL import Image

    (tmp / "images").mkdir()
    records = []
    for i in range(4):
        Image.new("RGB", (56, 56), (40 * i, 0, 0)).save(tmp / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "a red square"}]})
    import json

    (tmp / "train.json").write_text(json.dumps(records))
    config = load_config(None, [f"model.name_or_path={model}", f"data.train={tmp / 'train.json'}",
                                f"train.output_dir={tmp / 'run'}", "train.max_steps=2", "train.batch_size=2",
                                "train.save_steps=1000", "eval.num_samples=0", "lora.r=4"])
    counts: collections.Counter = collections.Counter()
    active = [False]

    def hook(event: str, hook_args: tuple) -> None:
        if not active[0] or event != "open" or not isinstance(hook_args[0], (str, Path)):
            return
        try:
            if str(Path(hook_args[0]).resolve()) != target:
                return
        except OSError:
            return
        frames = traceback.extract_stack()[:-1]
        where = next((f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}" for f in reversed(frames)
                      if "/vlmtune/" in f.filename and "/bench/" not in f.filename), None)
        library = next((f.filename.split("site-packages/")[1].split("/")[0] for f in reversed(frames)
                        if "site-packages/" in f.filename), "?")
        innermost_is_vlmtune = "/vlmtune/" in next(
            (f.filename for f in reversed(frames) if "/vlmtune/" in f.filename or "site-packages/" in f.filename), "")
        counts[("vlmtune" if innermost_is_vlmtune else library, where)] += 1

    sys.addaudithook(hook)
    active[0] = True
    train(config)
    active[0] = False
    total = sum(counts.values())
    own = sum(n for (who, _), n in counts.items() if who == "vlmtune")
    print(f"config.json opened {total} times during one train(): {own} by vlmtune itself, {total - own} by libraries")
    for (who, where), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:2d}  {who:12s} via {where}")


if __name__ == "__main__":
    main()
