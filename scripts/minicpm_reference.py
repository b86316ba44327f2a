"""Import the official MiniCPM-V / MiniCPM-o remote code from a folder, for the reference side of
`record_minicpm_params.py` and `minicpm_parity.py`.

Runs in the *reference* Python (the old transformers the remote code was written for), never in
vlmtune's. The folder's .py files are copied into a temporary package, the way transformers' dynamic
modules do, because they import each other with relative imports (`from .resampler import Resampler`).
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path

# (config module, config class, model module, model class) of each architecture's remote code.
CLASSES = {
    "minicpmv2": ("configuration_minicpm", "MiniCPMVConfig", "modeling_minicpmv", "MiniCPMV"),
    "minicpmv2_6": ("configuration_minicpm", "MiniCPMVConfig", "modeling_minicpmv", "MiniCPMV"),
    "minicpmo2_6": ("configuration_minicpm", "MiniCPMOConfig", "modeling_minicpmo", "MiniCPMO"),
}


def guess_arch(folder: Path) -> str:
    """The architecture whose remote code is in `folder` (by the files it holds)."""
    if (folder / "modeling_minicpmo.py").is_file():
        return "minicpmo2_6"
    if (folder / "modeling_minicpm.py").is_file():
        return "minicpmv2"
    if (folder / "modeling_navit_siglip.py").is_file():
        return "minicpmv2_6"
    raise SystemExit(f"{folder}: no MiniCPM-V 2.0 / 2.6 or MiniCPM-o 2.6 remote code (modeling_*.py) found")


def load_classes(folder: Path, arch: str):
    """(config class, model class) of the remote code in `folder`."""
    package_root = Path(tempfile.mkdtemp(prefix="minicpm_reference_"))
    package = package_root / "minicpm_remote_code"
    package.mkdir()
    for file in Path(folder).glob("*.py"):
        shutil.copy(file, package / file.name)
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(package_root))
    config_module, config_class, model_module, model_class = CLASSES[arch]
    config_cls = getattr(importlib.import_module(f"minicpm_remote_code.{config_module}"), config_class)
    model_cls = getattr(importlib.import_module(f"minicpm_remote_code.{model_module}"), model_class)
    return config_cls, model_cls


def register_tiny_timm_tower(name: str, vision_config: dict) -> None:
    """Register a small timm SigLIP ViT under `name`, shaped like `vit_so400m_patch14_siglip_384` (no class
    token, 'map' pooling), so that MiniCPM-V 2.0's `timm.create_model(config.vision_encoder)` builds it."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if name in timm.list_models():
        return
    args = dict(img_size=vision_config["image_size"], patch_size=vision_config["patch_size"],
                embed_dim=vision_config["hidden_size"], depth=vision_config["num_hidden_layers"],
                num_heads=vision_config["num_attention_heads"],
                mlp_ratio=vision_config["intermediate_size"] / vision_config["hidden_size"],
                class_token=False, global_pool="map")

    def tower(pretrained=False, **kwargs):
        return _create_vision_transformer("vit_so400m_patch14_siglip_384", pretrained=False, **dict(args, **kwargs))

    tower.__name__ = name
    register_model(tower)
