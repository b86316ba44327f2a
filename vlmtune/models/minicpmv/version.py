"""Which MiniCPM-V architecture a `config.json` describes, read from its fields (never the folder name).

The three supported checkpoints publish no common "architecture" key, so the decision uses what each
official `config.json` holds:

- MiniCPM-V 2.0 (`openbmb/MiniCPM-V-2`): `model_type: minicpmv`, no `version`, a timm vision tower named
  in `vision_encoder` (`vit_so400m_patch14_siglip_384.webli`) and the MiniCPM-2.4B language model's
  `scale_emb` / `dim_model_base` fields.
- MiniCPM-V 2.6 (`openbmb/MiniCPM-V-2_6`): `model_type: minicpmv`, `version: 2.6`, a NaViT SigLIP in
  `vision_config`, Qwen2 fields at the top level.
- MiniCPM-o 2.6 (`openbmb/MiniCPM-o-2_6`): `model_type: minicpmo`, `version: 2.6`; vlmtune uses its
  vision-language part only.

MiniCPM-Llama3-V 2.5 (`model_type: minicpmv` without `version` and without `vision_encoder`) and newer
versions (4.x) are refused with an error that says what is supported.
"""

from __future__ import annotations

from vlmtune.errors import VlmtuneError

MINICPMV2 = "minicpmv2"
MINICPMV2_6 = "minicpmv2_6"
MINICPMO2_6 = "minicpmo2_6"
ARCHS = (MINICPMV2, MINICPMV2_6, MINICPMO2_6)

SUPPORTED = ("MiniCPM-V 2.0 (openbmb/MiniCPM-V-2), MiniCPM-V 2.6 (openbmb/MiniCPM-V-2_6) and "
             "MiniCPM-o 2.6 (openbmb/MiniCPM-o-2_6, vision-language part)")


def _version(config: dict) -> str | None:
    version = config.get("version")
    return None if version is None else str(version)


def detect_arch(config: dict, where: str = "config.json") -> str:
    """'minicpmv2', 'minicpmv2_6' or 'minicpmo2_6' for the checkpoint whose config.json is `config`.

    Raises:
        VlmtuneError: an architecture vlmtune does not implement (MiniCPM-Llama3-V 2.5, 4.x, unknown).
    """
    model_type = config.get("model_type")
    version = _version(config)
    if model_type == "minicpmo":
        if version in (None, "2.6"):
            return MINICPMO2_6
        raise VlmtuneError(f"{where}: MiniCPM-o version {version} is not supported; vlmtune supports {SUPPORTED}. "
                           "Newer MiniCPM-V/o releases that ship with transformers load through the generic path.")
    if model_type != "minicpmv":
        raise VlmtuneError(f"{where}: model_type {model_type!r} is not a MiniCPM-V checkpoint; vlmtune's MiniCPM-V "
                           f"code supports {SUPPORTED}")
    if version == "2.6":
        return MINICPMV2_6
    if version is None:
        if "vision_encoder" in config and "scale_emb" in config:
            return MINICPMV2
        raise VlmtuneError(
            f"{where}: this looks like MiniCPM-Llama3-V 2.5 (model_type minicpmv, no version, no timm "
            f"vision_encoder), which vlmtune does not implement; supported: {SUPPORTED}")
    raise VlmtuneError(f"{where}: MiniCPM-V version {version} is not supported; vlmtune supports {SUPPORTED}. "
                       "MiniCPM-V 4.6 and 4.7 are native in transformers and load through the generic path.")
