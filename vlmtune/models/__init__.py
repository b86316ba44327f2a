"""Model families. `family_for(path)` reads `config.json`'s model_type and returns its `Family`;
`family_of(config, path)` does the same for a config.json already read."""

from __future__ import annotations

from pathlib import Path

from vlmtune.models import generic, minicpmv2, minicpmv4, qwen2_5_vl, qwen2_vl, qwen3_vl
from vlmtune.models.family import Family, check_vision_language, read_model_config
from vlmtune.models.minicpmv import detect_arch

FAMILIES: dict[str, Family] = {
    "qwen2_vl": qwen2_vl.FAMILY,
    "qwen2_5_vl": qwen2_5_vl.FAMILY,
    "qwen3_vl": qwen3_vl.FAMILY,
    "minicpmv4_6": minicpmv4.MINICPMV4_6,
    "minicpmv4_7": minicpmv4.MINICPMV4_7,
    **minicpmv2.FAMILIES,
}


def family_for(path: str | Path) -> Family:
    """The family of the checkpoint in folder `path` (generic when not one vlmtune knows by name).

    Raises:
        VlmtuneError: no readable config.json, a text-only language model, or a MiniCPM-V version
            vlmtune does not implement.
    """
    return family_of(read_model_config(path), path)


def family_of(config: dict, path: str | Path) -> Family:
    """The family of a checkpoint whose `config.json` (in folder `path`) reads as `config`."""
    if config["model_type"] in minicpmv2.MODEL_TYPES:  # one model_type, several architectures
        return FAMILIES[detect_arch(config, where=str(Path(path) / "config.json"))]
    if config["model_type"] in FAMILIES:
        return FAMILIES[config["model_type"]]
    check_vision_language(config, path)
    return generic.FAMILY


__all__ = ["FAMILIES", "Family", "family_for", "family_of"]
