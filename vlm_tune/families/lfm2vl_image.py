"""LFM2-VL's image processor without torchvision: a PIL/NumPy port of transformers' `Lfm2VlImageProcessor`.

transformers 5.24 ships LFM2-VL's image processor only as a torchvision class
(`models/lfm2_vl/image_processing_lfm2_vl.py`), and torchvision cannot be installed beside the CPU torch wheel
on machines like ours. This port repeats its arithmetic step for step (same names below):

- `smart_resize`: round each side to a multiple of encoder_patch_size * downsample_factor, then scale so the
  pixel count lies in [min_image_tokens, max_image_tokens] * (encoder_patch_size * downsample_factor)**2.
- `is_image_too_large`: the rounded image holds more than max_image_tokens * ... * max_pixels_tolerance pixels.
- a large image (with splitting on) is resized to a grid of tile_size tiles (the grid of min_tiles..max_tiles
  tiles whose aspect ratio is closest to the image's; ties go to the larger grid when the image covers more
  than half its area), split row by row, plus a thumbnail at the smart-resize size when use_thumbnail and the
  grid has more than one tile; any other image is one tile at the smart-resize size.
- each tile is rescaled, normalised, cut into encoder_patch_size patches (row-major, each patch's pixels
  row-major with channels last) and padded to max_num_patches; `pixel_attention_mask` marks real patches and
  `spatial_shapes` holds each tile's patch grid (rows, cols).

Resizing uses PIL's bilinear filter (antialiased), which torchvision's antialiased bilinear resize imitates;
pixel values may differ by rounding, every shape, mask and token count is the same (a GPU test compares).
The class is saved under the real name (`image_processor_type: Lfm2VlImageProcessor`, PilBackend drops the
`Pil` suffix), so users with torchvision load the original class from the same files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs

from vlm_tune.errors import UserError

SETTINGS = (  # the image processor's tiling/resolution settings (names as in transformers)
    "downsample_factor",
    "do_image_splitting",
    "min_tiles",
    "max_tiles",
    "use_thumbnail",
    "min_image_tokens",
    "max_image_tokens",
    "encoder_patch_size",
    "tile_size",
    "max_pixels_tolerance",
)


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    downsample_factor: int,
    min_image_tokens: int,
    max_image_tokens: int,
    encoder_patch_size: int,
) -> tuple[int, int]:
    """(width, height) of the single-tile / thumbnail resize (the order transformers returns)."""
    total = encoder_patch_size * downsample_factor
    min_pixels = min_image_tokens * encoder_patch_size**2 * downsample_factor**2
    max_pixels = max_image_tokens * encoder_patch_size**2 * downsample_factor**2
    h_bar = max(total, round_by_factor(height, total))
    w_bar = max(total, round_by_factor(width, total))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(total, math.floor(height / beta / total) * total)
        w_bar = max(total, math.floor(width / beta / total) * total)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / total) * total
        w_bar = math.ceil(width * beta / total) * total
    return w_bar, h_bar


def is_image_too_large(
    height: int,
    width: int,
    max_image_tokens: int,
    encoder_patch_size: int,
    downsample_factor: int,
    max_pixels_tolerance: float,
) -> bool:
    total = encoder_patch_size * downsample_factor
    h_bar = max(encoder_patch_size, round_by_factor(height, total))  # sic: the floor is one patch here
    w_bar = max(encoder_patch_size, round_by_factor(width, total))
    return (
        h_bar * w_bar > max_image_tokens * encoder_patch_size**2 * downsample_factor**2 * max_pixels_tolerance
    )


def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Grids (cols, rows) with min_tiles..max_tiles tiles, by tile count (same order as transformers)."""
    ratios = [
        (w, h)
        for n in range(min_tiles, max_tiles + 1)
        for w in range(1, n + 1)
        for h in range(1, n + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    return sorted(set(ratios), key=lambda x: x[0] * x[1])


def closest_ratio(
    aspect_ratio: float, ratios: list[tuple[int, int]], width: int, height: int, tile_size: int
) -> tuple[int, int]:
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def layout(height: int, width: int, s: dict[str, Any]) -> tuple[int, int, list[int], bool]:
    """(rows, cols, [new_height, new_width], tiled) of one image under settings `s` (keys of SETTINGS)."""
    min_tiles, max_tiles = (s["min_tiles"], s["max_tiles"]) if s["do_image_splitting"] else (1, 1)
    splitting = not min_tiles == max_tiles == 1
    large = is_image_too_large(
        height,
        width,
        s["max_image_tokens"],
        s["encoder_patch_size"],
        s["downsample_factor"],
        s["max_pixels_tolerance"],
    )
    new_w, new_h = smart_resize(
        height,
        width,
        s["downsample_factor"],
        s["min_image_tokens"],
        s["max_image_tokens"],
        s["encoder_patch_size"],
    )
    if large and splitting:
        cols, rows = closest_ratio(
            width / height, target_ratios(min_tiles, max_tiles), width, height, s["tile_size"]
        )
        return rows, cols, [new_h, new_w], True
    return 1, 1, [new_h, new_w], False


def max_num_patches(s: dict[str, Any]) -> int:
    """Patches every tile is padded to (transformers' formula): the largest single image or a whole tile."""
    tile_patches = (s["tile_size"] // s["encoder_patch_size"]) ** 2 if s["do_image_splitting"] else 0
    return max(s["max_image_tokens"] * s["downsample_factor"] ** 2, tile_patches)


def check_fits(height: int, width: int, s: dict[str, Any]) -> None:
    """Refuse an image whose single tile or thumbnail would hold more patches than every tile is padded to.

    smart_resize keeps each side at least encoder_patch_size * downsample_factor, so a very elongated image
    (e.g. 20:1 at 16 tokens, over 256:1 at the published 256) overshoots max_image_tokens; transformers'
    Lfm2VlImageProcessor then fails inside torch.stack. Raised before step 0 by the pre-flight count.
    """
    rows, cols, (new_h, new_w), tiled = layout(height, width, s)
    if tiled and (rows * cols == 1 or not s["use_thumbnail"]):
        return
    p = s["encoder_patch_size"]
    n, limit = (new_h // p) * (new_w // p), max_num_patches(s)
    if n > limit:
        raise UserError(
            f"an image of {width}x{height} px is too elongated for LFM2-VL's image processor: resized to "
            f"{new_w}x{new_h} px it has {n} patches, more than the {limit} every tile is padded to "
            "(transformers' Lfm2VlImageProcessor fails on it too). Crop or pad it to a less extreme aspect "
            "ratio, or raise model.image.max_image_tokens."
        )


def expansion(processor: Any, height: int, width: int) -> str:
    """The text one `<image>` placeholder becomes in `processor` (Lfm2VlProcessor's own token builder)."""
    ip = processor.image_processor
    s = {k: getattr(ip, k) for k in SETTINGS}
    rows, cols, size, _ = layout(height, width, s)
    per_tile = processor._compute_tokens_per_tile(
        s["tile_size"], s["encoder_patch_size"], s["downsample_factor"]
    )
    for_image = processor._compute_tokens_for_image(size, s["encoder_patch_size"], s["downsample_factor"])
    return processor._build_image_tokens(
        rows, cols, per_tile, for_image, s["use_thumbnail"], processor.use_image_special_tokens
    )


def image_token_counts(processor: Any, sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens each (height, width) image expands to, from the layout alone (no pixels are processed); an
    image the image processor cannot pad is a UserError (`check_fits`)."""
    ip = processor.image_processor
    for h, w in sizes:
        check_fits(h, w, {k: getattr(ip, k) for k in SETTINGS})
    texts = [expansion(processor, h, w) for h, w in sizes]
    return [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def to_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W) → (H/p * W/p, p * p * C): patches row-major, each patch's pixels row-major, channels last."""
    c, h, w = image.shape
    patches = image.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return patches.transpose(1, 3, 2, 4, 0).reshape((h // patch_size) * (w // patch_size), -1)


class Lfm2VlImageProcessorKwargs(ImagesKwargs, total=False):
    """The torchvision class's keyword arguments (its module cannot be imported without torchvision)."""

    downsample_factor: int
    do_image_splitting: bool
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    min_image_tokens: int
    max_image_tokens: int
    encoder_patch_size: int
    tile_size: int
    max_pixels_tolerance: float
    do_pad: bool
    return_row_col_info: bool


class Lfm2VlImageProcessorPil(PilBackend):
    """PIL/NumPy `Lfm2VlImageProcessor`: same defaults, settings, outputs and saved files."""

    downsample_factor = 2
    do_image_splitting = True
    min_tiles = 2
    max_tiles = 10
    use_thumbnail = True
    min_image_tokens = 64
    max_image_tokens = 256
    encoder_patch_size = 16
    tile_size = 512
    max_pixels_tolerance = 2.0
    do_resize = True
    size = {"height": 512, "width": 512}
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_pad = True
    return_row_col_info = False
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    valid_kwargs = Lfm2VlImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_num_patches = max_num_patches({k: getattr(self, k) for k in SETTINGS})

    def _tiles(
        self, image: np.ndarray, s: dict[str, Any], resample: Any
    ) -> tuple[list[np.ndarray], int, int, list[int]]:
        """One (C, H, W) image → its tiles (thumbnail last), rows, cols, [new_height, new_width]."""
        _, height, width = image.shape
        rows, cols, (new_h, new_w), tiled = layout(height, width, s)
        if not tiled:
            return (
                [self.resize(image, SizeDict(height=new_h, width=new_w), resample=resample)],
                1,
                1,
                [new_h, new_w],
            )
        t = s["tile_size"]
        grid = self.resize(image, SizeDict(height=t * rows, width=t * cols), resample=resample)
        tiles = [grid[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(rows) for c in range(cols)]
        if s["use_thumbnail"] and rows * cols != 1:
            tiles.append(self.resize(image, SizeDict(height=new_h, width=new_w), resample=resample))
        return tiles, rows, cols, [new_h, new_w]

    def _preprocess(
        self,
        images: list[np.ndarray],
        resample: Any,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float],
        image_std: float | list[float],
        do_pad: bool,
        return_row_col_info: bool,
        return_tensors: Any,
        **kwargs: Any,
    ) -> BatchFeature:
        s = {k: kwargs[k] if kwargs.get(k) is not None else getattr(self, k) for k in SETTINGS}
        if s["do_image_splitting"] and s["min_tiles"] > s["max_tiles"]:
            raise ValueError("min_tiles must be less than or equal to max_tiles")
        p = s["encoder_patch_size"]
        padded_to = max_num_patches(s)
        pixel_values, masks, shapes, rows, cols, sizes = [], [], [], [], [], []
        for image in images:
            check_fits(image.shape[1], image.shape[2], s)
            tiles, r, c, size = self._tiles(image, s, resample)
            rows.append(r)
            cols.append(c)
            sizes.append(size)
            for tile in tiles:
                tile = tile.astype(np.float32)
                if do_rescale:
                    tile = self.rescale(tile, rescale_factor)
                if do_normalize:
                    tile = self.normalize(tile, image_mean, image_std)
                patches = to_patches(tile.astype(np.float32), p)
                shapes.append([tile.shape[1] // p, tile.shape[2] // p])
                if do_pad:
                    mask = np.ones((padded_to,), dtype=np.int32)
                    missing = padded_to - patches.shape[0]
                    if missing > 0:
                        patches = np.pad(patches, ((0, missing), (0, 0)))
                        mask[-missing:] = 0
                    masks.append(mask)
                pixel_values.append(patches)
        data: dict[str, Any] = {"pixel_values": torch.from_numpy(np.stack(pixel_values))}
        if do_pad:
            data["pixel_attention_mask"] = torch.from_numpy(np.stack(masks))
            data["spatial_shapes"] = torch.tensor(shapes)
        if return_row_col_info:
            data |= {"image_rows": rows, "image_cols": cols, "image_sizes": sizes}
        return BatchFeature(data=data, tensor_type=return_tensors)
