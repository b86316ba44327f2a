"""Loading a model and its processor from a local folder or a hub id (Hugging Face or ModelScope).

Nothing from a model folder is executed unless the user passes `--trust-remote-code`; the
commands turn that flag into `trust_remote_code=True` here, and a config's own value never does
(`vlmtune.config.remote_code_flag`, `saved_remote_code`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vlmtune.errors import VlmtuneError
from vlmtune.models import Family, family_for


def resolve_model_path(name_or_path: str, hub: str = "hf", revision: str | None = None) -> Path:
    """A local folder holding the checkpoint: `name_or_path` itself, or a hub snapshot of it.

    Raises:
        VlmtuneError: the folder does not exist and the hub cannot be reached, or the id is unknown.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise VlmtuneError(f"model {name_or_path!r}: no such folder, and it is not a hub id like 'Qwen/Qwen2-VL-2B-Instruct'")
    try:
        if hub == "modelscope":
            try:
                from modelscope import snapshot_download
            except ImportError:
                raise VlmtuneError("hub 'modelscope' needs the modelscope package: pip install 'vlmtune[modelscope]'") from None
            return Path(snapshot_download(name_or_path, revision=revision or "master"))
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, revision=revision))
    except VlmtuneError:
        raise
    except Exception as e:  # network errors come in many classes across the two hubs
        raise VlmtuneError(
            f"could not fetch model {name_or_path!r} from {hub} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Without network access, download it elsewhere and pass the local folder as model.name_or_path.") from None


def check_adapter(adapter: str | Path) -> Path:
    """The LoRA adapter folder `adapter`, checked before any model loads (peft's own error comes
    only after the base model has loaded, as a traceback).

    Raises:
        VlmtuneError: no such folder, or one without adapter_config.json and adapter weights.
    """
    path = Path(adapter).expanduser()
    if not path.exists():
        raise VlmtuneError(f"--adapter {adapter}: no such folder; pass the folder holding adapter_config.json "
                           "(a run's final/ or one of its checkpoint-N/)")
    if not path.is_dir():
        raise VlmtuneError(f"--adapter {adapter}: is a file; pass the folder holding adapter_config.json")
    if not (path / "adapter_config.json").is_file():
        inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
        hint = f"; it has {', '.join(inside)}: pass one of those" if inside else \
            " (a LoRA checkpoint written by vlmtune train holds adapter_config.json and adapter_model.safetensors)"
        raise VlmtuneError(f"--adapter {adapter}: holds no adapter_config.json, so it is not a LoRA adapter{hint}")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise VlmtuneError(f"--adapter {adapter}: has adapter_config.json but no adapter_model.safetensors; "
                           "the adapter weights are missing")
    return path


def pick_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


_WARNED: set[Path] = set()


def warn_remote_code(path: Path) -> None:
    """Say, once per folder, which Python files of `path` transformers may now import and run: the
    user enabled remote code and should know exactly what that executes."""
    path = Path(path).resolve()
    if path in _WARNED:
        return
    _WARNED.add(path)
    files = sorted(p.name for p in path.glob("*.py"))
    what = f"these Python files of {path} may run: {', '.join(files)}" if files else \
        f"{path} holds no Python files, so nothing from it runs"
    print(f"warning: --trust-remote-code: {what}. Read them first; they run with your permissions.",
          file=sys.stderr, flush=True)


def _check_remote_code(path: Path, trust_remote_code: bool, config: dict | None = None) -> None:
    """Refuse a model that exists only as remote code unless remote code was enabled; when it
    was, list the files it runs.

    Args:
        config: `path`'s config.json, if the caller has read it already.
    """
    if trust_remote_code:
        warn_remote_code(path)
        return
    if config is None:
        if not (path / "config.json").is_file():  # a LoRA checkpoint folder has a processor but no config.json
            return
        config = json.loads((path / "config.json").read_text())
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING and "auto_map" in config:
        raise VlmtuneError(
            f"{path}: model_type {config.get('model_type')!r} is not built into transformers and exists only as "
            "remote code in the model folder. vlmtune runs code from a model folder only when you pass "
            "--trust-remote-code on the command line (model.trust_remote_code=true in a config is not enough); "
            "read that code first.")


def load_processor(path: Path, family: Family, min_pixels: int | None = None, max_pixels: int | None = None,
                   trust_remote_code: bool = False, max_slice_nums: int | None = None, model_config: dict | None = None):
    """The processor in `path` (a model folder, or a checkpoint folder vlmtune saved one into).

    Args:
        min_pixels, max_pixels: per-image pixel budget (Qwen families).
        max_slice_nums: most slices per image (MiniCPM-V 2.x); None keeps the checkpoint's.
        model_config: `path`'s config.json, if the caller has read it already.
    """
    if family.own_implementation:  # vlmtune's own processor reads the folder as data; its Python files never run
        from vlmtune.models.minicpmv.processing import load_minicpm_processor

        return load_minicpm_processor(path, max_slice_nums=max_slice_nums)
    from transformers import AutoProcessor

    _check_remote_code(Path(path), trust_remote_code, model_config)  # processors can be remote code too, and load first
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise VlmtuneError(f"{path}: the processor has no tokenizer or image processor; is this a vision-language model?")
    if family.pixel_budget and (min_pixels or max_pixels):
        # Set on the image processor's `size`, which its calls read. Not `from_pretrained(max_pixels=...)`:
        # transformers 5 keeps such kwargs in the tokenizer's init_kwargs too and passes them to every
        # call, by the deprecated min_pixels/max_pixels route (a FutureWarning each time).
        size = processor.image_processor.size
        processor.image_processor.size = {"shortest_edge": min_pixels or size["shortest_edge"],
                                          "longest_edge": max_pixels or size["longest_edge"]}
    return processor


def model_class(path: Path, family: Family, model_config: dict | None = None) -> type:
    """The class `load_model` loads `path` with (read from config.json, nothing imported from the folder).

    Args:
        model_config: `path`'s config.json, if the caller has read it already.
    """
    if family.own_implementation:
        from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration

        return MiniCPMVForConditionalGeneration
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = model_config if model_config is not None else json.loads((Path(path) / "config.json").read_text())
    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config["model_type"])
    if name is None:
        return AutoModelForImageTextToText  # remote code: only trust_remote_code would tell
    import transformers

    return getattr(transformers, name)


def load_model(path: Path, dtype: torch.dtype, quantization: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, device_map=None, family: Family | None = None,
               model_config: dict | None = None):
    """The model in `path`: an `AutoModelForImageTextToText`, or vlmtune's own class for the families
    it implements itself (MiniCPM-V 2.x), whatever Python files the folder holds.

    Args:
        quantization: None, "4bit" or "8bit" (QLoRA, through bitsandbytes on a CUDA device).
        family, model_config: `path`'s family and config.json, if the caller has them already.
    """
    from transformers import AutoModelForImageTextToText

    if (family or family_for(path)).own_implementation:
        from vlmtune.models.minicpmv.modeling import MiniCPMVForConditionalGeneration as model_class
        kwargs: dict = {"dtype": dtype}
    else:
        model_class = AutoModelForImageTextToText
        _check_remote_code(path, trust_remote_code, model_config)
        kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization:
        if not torch.cuda.is_available():
            raise VlmtuneError("QLoRA (4-/8-bit base weights) needs a CUDA device with bitsandbytes; none is available "
                               "here. Use method: lora on CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise VlmtuneError("QLoRA needs bitsandbytes: pip install 'vlmtune[qlora]'") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    return model_class.from_pretrained(path, **kwargs)


def load_model_and_processor(name_or_path: str, hub: str = "hf", revision: str | None = None, dtype: str = "auto",
                             min_pixels: int | None = None, max_pixels: int | None = None,
                             trust_remote_code: bool = False, quantization: str | None = None,
                             max_slice_nums: int | None = None):
    """(model, processor, family, local path) in one call, for commands that just need to run a model."""
    path = resolve_model_path(name_or_path, hub, revision)
    family = family_for(path)
    processor = load_processor(path, family, min_pixels, max_pixels, trust_remote_code, max_slice_nums)
    model = load_model(path, pick_dtype(dtype), quantization, trust_remote_code)
    return model, processor, family, path
