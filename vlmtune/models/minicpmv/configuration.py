"""The configuration of MiniCPM-V 2.0 / 2.6 and MiniCPM-o 2.6, read and written in the official layout.

The official `config.json` files are flat: the language model's fields (Qwen2 for 2.6, MiniCPM-2.4B for
2.0) sit at the top level beside `query_num`, `slice_config`, `vision_config`, `version`, `auto_map` ...
`MiniCPMVConfig` keeps every key it is given and writes them back under the same names, so a folder
saved by vlmtune still loads in the official remote code and in vLLM. The language model gets its own
transformers config (`llm_config()`), built from the top-level fields and never saved.
"""

from __future__ import annotations

from typing import Any

from transformers import Idefics2VisionConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from vlmtune.models.minicpmv.version import MINICPMV2, detect_arch

# Keys transformers 5 renames or drops on load; restored on save so the file keeps the official layout.
_ROPE_SCALING = "_official_rope_scaling"
_USE_CACHE = "_official_use_cache"
_GIVEN = "_official_keys"
_ABSENT = "__absent__"

# timm vision towers MiniCPM-V 2.0 names in `vision_encoder` (timm's own model definitions).
TIMM_VISION_TOWERS = {
    "vit_so400m_patch14_siglip_384.webli": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                                               intermediate_size=4304, patch_size=14, image_size=384),
    "vit_so400m_patch14_siglip_384": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                                         intermediate_size=4304, patch_size=14, image_size=384),
}

# The NaViT SigLIP of MiniCPM-V 2.6 / o-2.6 when `vision_config` leaves a field out (the reference's defaults).
NAVIT_DEFAULTS = dict(hidden_size=1152, image_size=980, intermediate_size=4304, num_attention_heads=16,
                      num_hidden_layers=27, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                      attention_dropout=0.0, num_channels=3)


class MiniCPMVConfig(PretrainedConfig):
    """All keys of the official config.json as attributes, plus `arch` (see `version.detect_arch`)."""

    model_type = "minicpmv"

    def __init__(self, **kwargs: Any):
        # transformers 5 turns `rope_scaling` into `rope_parameters` and forgets `use_cache`; remember them.
        given = sorted(kwargs)
        rope_scaling = kwargs.pop("rope_scaling", _ABSENT)
        use_cache = kwargs.pop("use_cache", _ABSENT)
        super().__init__(**kwargs)
        self.__dict__[_ROPE_SCALING] = rope_scaling
        self.__dict__[_USE_CACHE] = use_cache
        self.__dict__[_GIVEN] = given

    @property
    def arch(self) -> str:
        return detect_arch({"model_type": self.model_type, **{k: v for k, v in self.__dict__.items()
                                                            if k in ("version", "vision_encoder", "scale_emb")}})

    def set_max_slice_nums(self, n: int) -> None:
        """Most slices per image, where this version's config.json keeps it (2.6: `slice_config`, 2.0: top
        level), so that a folder saved after a run with another value still loads with its processor."""
        if isinstance(self.__dict__.get("slice_config"), dict):
            self.slice_config["max_slice_nums"] = int(n)
        if "max_slice_nums" in self.__dict__ or self.arch == MINICPMV2:
            self.max_slice_nums = int(n)

    def llm_config(self) -> PretrainedConfig:
        """A fresh transformers config for the language model (Qwen2 for 2.6 / o-2.6, Llama-shaped for 2.0)."""
        d = self.__dict__
        common = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                      intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                      num_attention_heads=d["num_attention_heads"],
                      num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                      hidden_act=d.get("hidden_act", "silu"), max_position_embeddings=d["max_position_embeddings"],
                      rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(d.get("tie_word_embeddings")),
                      attention_dropout=d.get("attention_dropout", 0.0), bos_token_id=d.get("bos_token_id"),
                      eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
                      initializer_range=d.get("initializer_range", 0.02),
                      rope_parameters={"rope_type": "default", "rope_theta": float(d.get("rope_theta", 10000.0))})
        if self.arch == MINICPMV2:
            # MiniCPM-2.4B is Llama-shaped plus three scalings (vlmtune.models.minicpmv.minicpm_llm).
            config = LlamaConfig(**common, attention_bias=bool(d.get("attention_bias", False)))
            config.scale_emb = float(d["scale_emb"])
            config.scale_depth = float(d["scale_depth"])
            config.dim_model_base = float(d["dim_model_base"])
        else:
            config = Qwen2Config(**common, use_sliding_window=bool(d.get("use_sliding_window", False)),
                                 sliding_window=d.get("sliding_window"), max_window_layers=d.get("max_window_layers", 28))
        config._attn_implementation = self._attn_implementation
        return config

    def get_text_config(self, decoder=None, encoder=None, **kwargs) -> PretrainedConfig:
        # Generation and peft read the decoder's layer layout from here; the flat official config has
        # Qwen2's `sliding_window` without `layer_types`, which would otherwise suggest sliding caches.
        return self.llm_config()

    def vision_settings(self) -> dict:
        """Width, depth, heads, MLP width, patch size and image size of the vision tower as built (after
        `drop_vision_last_layer`), plus the activation and norm epsilon."""
        d = self.__dict__
        if self.arch == MINICPMV2:
            name = d["vision_encoder"]
            given = d.get("vision_config") or TIMM_VISION_TOWERS.get(name)
            if given is None:
                raise ValueError(f"vision_encoder {name!r} is not a timm tower vlmtune knows ({', '.join(TIMM_VISION_TOWERS)}); "
                                 "give its size in vision_config (hidden_size, num_hidden_layers, ...)")
            settings = dict(hidden_act="gelu", layer_norm_eps=1e-6, num_channels=3, attention_dropout=0.0, **given)
        else:
            settings = {**NAVIT_DEFAULTS, **{k: v for k, v in (d.get("vision_config") or {}).items()
                                            if k in NAVIT_DEFAULTS}}
        if d.get("drop_vision_last_layer", False):
            settings["num_hidden_layers"] -= 1
        return settings

    def navit_config(self) -> Idefics2VisionConfig:
        """The 2.6 vision tower's settings in the shape transformers' Idefics2 vision classes take."""
        config = Idefics2VisionConfig(**self.vision_settings())
        config._attn_implementation = self._attn_implementation
        return config

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop(_GIVEN, None)
        rope_scaling = out.pop(_ROPE_SCALING, _ABSENT)
        use_cache = out.pop(_USE_CACHE, _ABSENT)
        out.pop("rope_parameters", None)
        if rope_scaling != _ABSENT:
            out["rope_scaling"] = rope_scaling
        if use_cache != _ABSENT:
            out["use_cache"] = use_cache
        if "dtype" in out:  # the official code reads torch_dtype (transformers 4.x)
            out["torch_dtype"] = out.pop("dtype")
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # transformers' diff drops values equal to its defaults; every key of the official file stays.
        out = super().to_diff_dict()
        full = self.to_dict()
        for key in self.__dict__.get(_GIVEN, []):
            if key in full and key != "_name_or_path":
                out[key] = full[key]
        return out


class MiniCPMOConfig(MiniCPMVConfig):
    """MiniCPM-o 2.6: the same layout under `model_type: minicpmo` (audio and TTS fields kept as given)."""

    model_type = "minicpmo"

    def __init__(self, **kwargs: Any):
        # Defined here on purpose: transformers replaces the __init__ of config subclasses that have none
        # of their own with a generic one, which would skip MiniCPMVConfig's.
        super().__init__(**kwargs)
