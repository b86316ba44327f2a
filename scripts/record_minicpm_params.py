"""Record the official MiniCPM-V checkpoints' parameter names and shapes, once, as vlmtune test data.

    /tmp/refvenv/bin/python scripts/record_minicpm_params.py --reference /path/to/remote_code --arch minicpmv2_6

Instantiates the official remote code (a folder with its modeling_*.py files, e.g. the hub checkpoint
folder) on the meta device with the published config.json values from
tests/data/minicpm/published_configs.json, and writes {name: shape} of its state_dict to
tests/data/minicpm/<arch>_params.json. MiniCPM-o 2.6 is built with init_audio / init_tts off: vlmtune
implements its vision-language part only. Run it with the Python that has the reference's transformers
(4.44.x) timm (0.9.x for MiniCPM-V 2.0) and accelerate; nothing from vlmtune is imported.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minicpm_reference import CLASSES, guess_arch, load_classes  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "minicpm"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="folder with the official remote-code .py files")
    parser.add_argument("--arch", choices=sorted(CLASSES), help="default: guessed from the folder's files")
    parser.add_argument("--out", type=Path, help="default: tests/data/minicpm/<arch>_params.json")
    parser.add_argument("--note", default="", help="where the reference files came from, kept in the output")
    args = parser.parse_args()
    arch = args.arch or guess_arch(args.reference)
    published = json.loads((DATA / "published_configs.json").read_text())
    config_dict = dict(published["configs"][arch])
    if arch == "minicpmo2_6":
        config_dict.update(init_audio=False, init_tts=False)
    config_cls, model_cls = load_classes(args.reference, arch)
    config = config_cls(**config_dict)
    config._attn_implementation = "eager"
    # accelerate's init_empty_weights puts parameters on the meta device as they are registered, and lets
    # other tensor code run on the CPU (timm computes its drop-path schedule with .item()).
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls(config)
    params = {name: list(t.shape) for name, t in model.state_dict().items()}
    import transformers

    record = {
        "_produced_by": "scripts/record_minicpm_params.py: the official remote code instantiated on the meta device "
                        "with the published config.json values (tests/data/minicpm/published_configs.json); "
                        "state_dict() names and shapes" + (", vision-language part only (init_audio/init_tts off)"
                                                           if arch == "minicpmo2_6" else ""),
        "_reference": f"{args.reference.name}: {', '.join(sorted(p.name for p in args.reference.glob('*.py')))}",
        "_versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                     f"{transformers.__version__}" + (f", timm {__import__('timm').__version__}"
                                                      if arch == "minicpmv2" else ""),
        "_reference_note": args.note,
        "_config_source": published["sources"][arch],
        "arch": arch,
        "params": params,
    }
    out = args.out or DATA / f"{arch}_params.json"
    # One tensor per line, so that a diff of this file reads as a list of changed parameters.
    header = {k: v for k, v in record.items() if k != "params"}
    lines = [json.dumps(header, indent=1)[:-2] + ',\n "params": {']
    lines += [f"  {json.dumps(name)}: {json.dumps(shape)}," for name, shape in params.items()]
    lines[-1] = lines[-1].rstrip(",")
    out.write_text("\n".join(lines) + "\n }\n}\n")
    json.loads(out.read_text())  # it must stay valid JSON
    print(f"{arch}: {len(params)} tensors, {sum(torch.Size(s).numel() for s in params.values()) / 1e9:.3f}B values -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
