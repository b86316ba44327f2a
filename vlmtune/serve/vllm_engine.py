"""`vlmtune serve --engine vllm`: the same run, handed to vLLM's OpenAI-compatible server.

vLLM (CUDA only, `pip install 'vlmtune[vllm]'`) serves a model folder, or a base model plus LoRA
modules. This module turns a vlmtune run into that command line: the merged folder or the base
with each adapter as a `--lora-modules NAME=PATH`, the run's image settings as
`--mm-processor-kwargs` (Qwen's pixel budget, MiniCPM-V's `max_slice_nums`), and the serve options
that vLLM has too (host, port, API key, images per prompt, local image folder, batch size). What
vLLM cannot do the run's way is refused or named before it starts: adapters that train whole
modules (merge those first), runs whose image settings differ, and a fixed image size (vLLM only
keeps a pixel budget: send images at the run's size).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.generation import Target, adapter_target, target_for, variant_name

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


def _processor_kwargs(target: Target, family) -> dict:
    """vLLM's `--mm-processor-kwargs` for the run's image settings. A fixed `data.image_size` has no
    vLLM equivalent: for a pixel-budget family the budget is pinned to its area, and the note says
    to send images at that size, which the processor then leaves as they are."""
    d = target.config.data
    kwargs = {}
    if family.pixel_budget:
        kwargs.update({k: v for k, v in (("min_pixels", d.min_pixels), ("max_pixels", d.max_pixels)) if v})
    if d.max_slice_nums:
        kwargs["max_slice_nums"] = d.max_slice_nums
    if d.image_size:
        f = family.patch_factor
        width, height = (max(f, round(s / f) * f) for s in d.image_size)
        if family.pixel_budget:
            kwargs.update(min_pixels=width * height, max_pixels=width * height)
        print(f"note: {variant_name(target)} trained on images resized to {width}x{height} (data.image_size); vLLM "
              f"does not resize to a fixed size, so send images at {width}x{height} for the answers eval gave",
              file=sys.stderr, flush=True)
    return kwargs


def _lora_rank(adapter: str) -> tuple[int, list[str]]:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return int(config.get("r") or 8), list(config.get("modules_to_save") or [])


def vllm_args(target: str | Target, adapters: dict[str, str], *, name: str | None = None, host: str = "127.0.0.1",
              port: int = 8000, api_key: str | None = None, allow_local_images: Path | None = None,
              max_images: int = 8, max_batch: int = 16, trust_remote_code: bool = False) -> list[str]:
    """The `vllm serve ...` arguments that serve `target` (and `adapters` on its base) as vlmtune would.

    Raises:
        VlmtuneError: something vLLM cannot serve the way the run was trained (see the module docstring).
    """
    from vlmtune.models import family_for
    from vlmtune.models.load import resolve_model_path

    t = target if isinstance(target, Target) else target_for(target, trust_remote_code)
    c = t.config
    own = name or variant_name(t)
    base = c.model.name_or_path if t.adapter else t.model
    family = family_for(resolve_model_path(base, c.model.hub, c.model.revision))
    if family.own_implementation and not trust_remote_code:
        raise VlmtuneError(f"vLLM runs {family.name} from the Python files of the model folder; pass "
                           "--trust-remote-code to allow that (read those files first), or use the default engine")
    loras = ([(own, t)] if t.adapter else []) + [(n, adapter_target(p, t, trust_remote_code))
                                                  for n, p in adapters.items()]
    settings = {n: _processor_kwargs(lt, family) for n, lt in [("base" if t.adapter else own, t), *loras]}
    if len({json.dumps(s, sort_keys=True) for s in settings.values()}) > 1:
        raise VlmtuneError("vLLM takes one set of image settings per server and these differ: "
                           + "; ".join(f"{n}: {s or 'the checkpoint defaults'}" for n, s in settings.items())
                           + ". Serve them separately, or with the default engine.")
    for n, lt in [(own, t), *loras]:
        d = lt.config.data
        if d.prompt or d.system_prompt:
            print(f"note: vLLM does not add {n}'s data.prompt / data.system_prompt to requests; send them in the "
                  "messages as training saw them", file=sys.stderr, flush=True)
    args = ["serve", base, "--served-model-name", "base" if t.adapter else own, "--host", host, "--port", str(port),
            "--max-num-seqs", str(max_batch), "--limit-mm-per-prompt", json.dumps({"image": max_images})]
    if c.model.dtype != "auto":
        args += ["--dtype", {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[c.model.dtype]]
    kwargs = next(iter(settings.values()))
    if kwargs:
        args += ["--mm-processor-kwargs", json.dumps(kwargs)]
    if loras:
        ranks = []
        for n, lt in loras:
            rank, whole = _lora_rank(lt.adapter)
            if whole:
                raise VlmtuneError(f"{n} trains whole modules beside its LoRA ({', '.join(whole)}), which vLLM's LoRA "
                                   f"cannot load; merge it (vlmtune merge {lt.run_dir or lt.adapter} --out DIR) and "
                                   "serve DIR")
            ranks.append(rank)
        rank = next((r for r in LORA_RANKS if r >= max(ranks)), max(ranks))
        args += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(loras)), "--lora-modules",
                 *[f"{n}={lt.adapter}" for n, lt in loras]]
    if api_key:
        args += ["--api-key", api_key]
    if allow_local_images:
        args += ["--allowed-local-media-path", str(allow_local_images)]
    if trust_remote_code:
        args.append("--trust-remote-code")
    return args


def serve_with_vllm(target: str, adapters: dict[str, str], **options) -> int:
    """Run vLLM's server on `target` in the foreground; its exit status.

    Raises:
        VlmtuneError: vLLM is not installed, or cannot serve the run as trained.
    """
    if importlib.util.find_spec("vllm") is None:
        raise VlmtuneError("--engine vllm needs vLLM, which is not installed in this environment: "
                           "pip install 'vlmtune[vllm]' (Linux with a CUDA GPU). The default engine "
                           "(--engine transformers) serves the same API on any device.")
    args = vllm_args(target, adapters, **options)
    executable = Path(sys.executable).with_name("vllm")
    command = [str(executable) if executable.exists() else shutil.which("vllm") or "vllm", *args]
    shown = [a if i == 0 or command[i - 1] != "--api-key" else "***" for i, a in enumerate(command)]
    print("running: " + " ".join(shown), file=sys.stderr, flush=True)
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:  # vLLM got the same Ctrl-C and is shutting down
        return process.wait()
