"""Image slicing and pixel layout of MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6.

Written for vlmtune from the behaviour of the official `image_processing_minicpmv.py` (2.6 and
o-2.6), the `slice_image` helpers of MiniCPM-V 2.0's `modeling_minicpmv.py` and OpenBMB's
`finetune/dataset.py`; all three slice an image the same way:

1. `multiple = min(ceil(W*H / scale_resolution**2), max_slice_nums)`. At most 1: no slicing, the
   image is resized (up or down) to about scale_resolution**2 pixels, sides rounded to patch
   multiples (`find_best_resize(..., allow_upscale=True)`).
2. Otherwise the overview is the image shrunk to about scale_resolution**2 pixels, and the grid
   (cols, rows) is picked among the factorisations of multiple-1, multiple and multiple+1
   (1 and counts above max_slice_nums excluded) as the one whose log aspect ratio is closest to
   the image's, the first one winning ties. The image is resized so that each grid cell is about
   scale_resolution**2 pixels with patch-multiple sides, and cut into cells row by row.

Every resize is PIL bicubic; pixels are scaled to [0, 1] and normalised with mean = std = 0.5.

Output (the contract with the model in `modeling.py`): the slices of all images in order (each
image's overview first, then its cells row-major) cut into p x p patches row-major, each patch
flattened as (channel, row in patch, column in patch):
    pixel_values [P_total, 3*p*p] float32, tgt_sizes [n_slices, 2] long (patch rows, patch cols).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from PIL import Image

from vlmtune.errors import VlmtuneError


def ensure_divide(length: float, patch_size: int) -> int:
    """`length` rounded to a multiple of `patch_size`, at least one patch. Python's round (halves to
    even) on purpose: it is what the official code uses, and it decides sizes at exact halves."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) with about scale_resolution**2 pixels and the aspect ratio of `size`, sides
    rounded to patch multiples. Images already smaller are only rounded unless `allow_upscale`."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
                    ) -> tuple[int, int]:
    """(width, height) the image is resized to before it is cut into `grid` = (cols, rows) cells."""
    width, height = size
    cols, rows = grid
    cell = (ensure_divide(width, cols) / cols, ensure_divide(height, rows) / rows)
    cell_w, cell_h = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=True)
    return cell_w * cols, cell_h * rows


def best_grid(size: tuple[int, int], scale_resolution: int, max_slice_nums: int,
              never_split: bool = False) -> tuple[int, int] | None:
    """The (cols, rows) grid an image of `size` = (width, height) is cut into, None when it is not."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    log_ratio = math.log(width / height)
    best, best_error = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < best_error:  # strict: the first grid found wins a tie, as in the official loop
                best, best_error = (cols, count // cols), error
    return best


@dataclass
class SlicedImage:
    """One image as the model sees it: the overview, then the grid cells row by row."""

    slices: list[Image.Image]
    grid: tuple[int, int] | None  # (cols, rows); None when the image was not sliced


@dataclass
class MiniCPMVImageProcessor:
    """Slicing settings and pixel layout. Field names follow the official `preprocessor_config.json`.

    Args:
        max_slice_nums: most grid cells an image is cut into (the overview not counted).
        scale_resolution: side of the square whose area each slice is resized to, in pixels.
        patch_size: vision patch side in pixels; slice sides are multiples of it.
        image_feature_size: query tokens per slice (the resampler's `query_num`).
        slice_mode: cut large images into a grid (every published checkpoint does).
        use_image_id: write `<image_id>N</image_id>` before each image (2.6 and o-2.6).
        version: 2.0 (MiniCPM-V 2.0 placeholder layout) or 2.6 (MiniCPM-V 2.6 and MiniCPM-o 2.6).
        norm_mean, norm_std: per-channel normalisation of [0, 1] pixels.
        im_start ... im_id_end, unk: the placeholder tokens.
        extra: other keys of the loaded `preprocessor_config.json` (auto_map, processor_class, audio
            settings of o-2.6), written back unchanged so a saved folder keeps the official layout.
    """

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    image_feature_size: int = 64
    slice_mode: bool = True
    use_image_id: bool = False
    version: float = 2.0
    norm_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    norm_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    im_start: str = "<image>"
    im_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    im_id_start: str = "<image_id>"
    im_id_end: str = "</image_id>"
    unk: str = "<unk>"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.slice_mode:
            raise VlmtuneError("MiniCPM-V processor: slice_mode=false is not supported (every published MiniCPM-V "
                               "2.0 / 2.6 / o-2.6 checkpoint slices images); set \"slice_mode\": true in "
                               "preprocessor_config.json")
        if self.version not in (2.0, 2.6):
            raise VlmtuneError(f"MiniCPM-V processor: version {self.version} is not supported; vlmtune knows the "
                               "layouts of 2.0 (MiniCPM-V 2.0) and 2.6 (MiniCPM-V 2.6, MiniCPM-o 2.6)")
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            if int(getattr(self, name)) < 1:
                raise VlmtuneError(f"MiniCPM-V processor: {name} must be a positive integer, "
                                   f"not {getattr(self, name)!r}")

    # -- settings as JSON -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, settings: dict) -> MiniCPMVImageProcessor:
        """From `preprocessor_config.json` values; keys it does not know are kept in `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in settings.items() if k in names}
        if "version" in known:
            known["version"] = float(known["version"])
        return cls(**known, extra={k: v for k, v in settings.items() if k not in names})

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.setdefault("image_processor_type", "MiniCPMVImageProcessor")
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return out

    # -- slicing ----------------------------------------------------------------------------
    def slice(self, image: Image.Image, max_slice_nums: int | None = None) -> SlicedImage:
        """The overview and grid cells of one RGB image."""
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else max_slice_nums
        size = image.size
        grid = best_grid(size, self.scale_resolution, max_slice_nums)
        if grid is None:
            resized = find_best_resize(size, self.scale_resolution, self.patch_size, allow_upscale=True)
            return SlicedImage([image.resize(resized, Image.Resampling.BICUBIC)], None)
        overview = image.resize(find_best_resize(size, self.scale_resolution, self.patch_size),
                                Image.Resampling.BICUBIC)
        refined = image.resize(get_refine_size(size, grid, self.scale_resolution, self.patch_size),
                               Image.Resampling.BICUBIC)
        cols, rows = grid
        cell_w, cell_h = refined.width // cols, refined.height // rows
        cells = [refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h))
                 for r in range(rows) for c in range(cols)]
        return SlicedImage([overview, *cells], grid)

    def patches(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One slice as [rows*cols, 3*p*p] normalised patches (row-major) and its (rows, cols)."""
        p = self.patch_size
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        mean = np.asarray(self.norm_mean, dtype=np.float32)
        std = np.asarray(self.norm_std, dtype=np.float32)
        x = torch.from_numpy((array - mean) / std).permute(2, 0, 1)  # [3, H, W]
        rows, cols = x.shape[1] // p, x.shape[2] // p
        if rows * p != x.shape[1] or cols * p != x.shape[2]:  # slicing always gives patch multiples
            raise VlmtuneError(f"MiniCPM-V processor: slice of {x.shape[2]}x{x.shape[1]} px is not a multiple of "
                               f"patch_size {p}")
        x = x.reshape(3, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3 * p * p)
        return x.contiguous(), (rows, cols)

    def __call__(self, images: list[Image.Image], max_slice_nums: int | None = None) -> dict:
        """Slices of `images` (in order) as model inputs, plus each image's grid for its placeholder.

        Returns:
            {"pixel_values": [P_total, 3*p*p], "tgt_sizes": [n_slices, 2], "grids": [grid or None, ...]}
        """
        pixels, sizes, grids = [], [], []
        for image in images:
            sliced = self.slice(image.convert("RGB"), max_slice_nums)
            grids.append(sliced.grid)
            for part in sliced.slices:
                patches, size = self.patches(part)
                pixels.append(patches)
                sizes.append(size)
        p = self.patch_size
        return {
            "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, 3 * p * p),
            "tgt_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
            "grids": grids,
        }

    # -- placeholders -----------------------------------------------------------------------
    def image_id(self, index: int) -> str:
        return f"{self.im_id_start}{index}{self.im_id_end}"

    def placeholder(self, grid: tuple[int, int] | None, image_index: int | None = None) -> str:
        """The text an image is replaced with, as the official processor of this version builds it.

        2.0: `<image>` + unk*Q + `</image>`, then for a sliced image `<slice>` + the grid rows joined
        by "\\n" + `</slice>`, each cell again `<image>` + unk*Q + `</image>` (2.0's
        `get_grid_placeholder`). 2.6: `<image_id>i</image_id>` first when use_image_id and an
        `image_index` is given, the overview as in 2.0, then the rows joined by "\\n" with each cell
        `<slice>` + unk*Q + `</slice>` and no wrapper (2.6's `get_grid_placeholder`).
        """
        queries = self.unk * self.image_feature_size
        text = self.im_start + queries + self.im_end
        if self.version >= 2.6 and self.use_image_id and image_index is not None:
            text = self.image_id(image_index) + text
        if grid is None:
            return text
        cols, rows = grid
        if self.version >= 2.6:
            cell = self.slice_start + queries + self.slice_end
            return text + "\n".join(cell * cols for _ in range(rows))
        cell = self.im_start + queries + self.im_end
        return text + self.slice_start + "\n".join(cell * cols for _ in range(rows)) + self.slice_end
