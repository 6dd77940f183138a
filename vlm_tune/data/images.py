"""Image values → RGB PIL images: files, bytes, PIL objects, frame folders and video files (frames sampled
evenly, decoded by seeking so a long video is not decoded whole). Errors are `BadRow`s naming row and file."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageFile

from vlm_tune.errors import BadRow

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: palette/alpha composited on white, 16-bit and float rescaled to 8 bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else arr * 0
        image = Image.fromarray(arr.astype("uint8"), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageSize(NamedTuple):
    """An image's size read from its header, nothing decoded: `.width` and `.height`, as a PIL image has them
    (what measuring a row's tokens reads; `RowSet.row(i, images="sizes")`)."""

    width: int
    height: int


def _opened(value: Any, base_dir: Path | None, row_id: str, column: str, decode: bool) -> Image.Image:
    """The image of one value (PIL image, {'bytes','path'} dict, path string); decode=False reads only its
    header (size and mode). Raises BadRow."""
    what = "image"
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (dict, str, os.PathLike)):
            path = value.get("path") if isinstance(value, dict) else value
            if not path:
                raise BadRow("missing_image", row_id, column, "no image given")
            path = Path(path)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise BadRow("missing_image", row_id, column, f"image file not found: {path}")
            what = f"image file {path}"
            image = Image.open(path)
        elif value is None:
            raise BadRow("missing_image", row_id, column, "image is empty (None)")
        else:
            raise BadRow(
                "missing_image", row_id, column, f"cannot read an image from a {type(value).__name__}"
            )
        if decode:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            image.load()
    except BadRow:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise BadRow(
            "corrupt_image", row_id, column, f"{what} cannot be decoded ({type(err).__name__}: {err})"
        ) from None
    if image.width == 0 or image.height == 0:
        raise BadRow("empty_image", row_id, column, "image has zero size")
    return image


def open_image(value: Any, base_dir: Path | None, row_id: str, column: str) -> Image.Image:
    """Decode one image value (PIL image, {'bytes','path'} dict, path string) into RGB, or raise BadRow."""
    return to_rgb(_opened(value, base_dir, row_id, column, decode=True))


def image_size(value: Any, base_dir: Path | None, row_id: str, column: str) -> ImageSize:
    """The size of one image value, from its header (decoding to RGB changes the mode, never the size)."""
    image = _opened(value, base_dir, row_id, column, decode=False)
    size = ImageSize(image.width, image.height)
    if image is not value:  # opened here: release its file now, not when collected
        image.close()
    return size


def sample_frames(paths: list[Any], max_frames: int) -> list[Any]:
    """Keep at most max_frames, evenly spaced, in temporal order."""
    if len(paths) <= max_frames:
        return paths
    step = len(paths) / max_frames
    return [paths[int(i * step)] for i in range(max_frames)]


def video_frames(path: Path, max_frames: int, row_id: str, column: str) -> list[Image.Image]:
    """Frames sampled evenly from a video file (needs PyAV: `pip install 'vlm-tune[video]'`)."""
    try:
        import av  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        raise BadRow(
            "video_decoder_missing",
            row_id,
            column,
            f"{path.name} is a video; install PyAV (`pip install 'vlm-tune[video]'`) or give a folder of frames",
        ) from None
    try:
        frames, _ = decode_sampled_frames(path, max_frames)
    except Exception as err:
        raise BadRow("corrupt_image", row_id, column, f"video cannot be decoded: {err}") from None
    if not frames:
        raise BadRow("empty_image", row_id, column, f"video {path} has no frames")
    return [to_rgb(f) for f in frames]


def decode_sampled_frames(path: Path, max_frames: int) -> tuple[list[Image.Image], int]:
    """(frames, frames decoded): the frames `sample_frames` picks, without decoding the whole video.

    With a known frame count, seek to the keyframe before each wanted frame and decode forward to it
    (at most one group of pictures per sample); with an unknown count, decode in order and keep a
    reservoir of evenly spaced frames. Only kept frames are converted to images.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames or 0
        rate = stream.average_rate or stream.guessed_rate
        if total <= 0 or not rate or stream.time_base is None:
            decoded = list(container.decode(stream))
            return [f.to_image() for f in sample_frames(decoded, max_frames)], len(decoded)
        wanted = sample_frames(list(range(total)), max_frames)
        start = stream.start_time or 0
        ticks = 1 / (rate * stream.time_base)  # pts per frame
        frames: list[Image.Image] = []
        n_decoded = 0
        last = None
        for index in wanted:
            target = start + int(round(index * ticks))
            if last is None or last.pts is None or target < last.pts or target - last.pts > 2 * ticks:
                container.seek(target, stream=stream, backward=True, any_frame=False)
                last = None
            if last is not None and last.pts is not None and last.pts >= target:
                frames.append(last.to_image())
                continue
            for frame in container.decode(stream):
                n_decoded += 1
                last = frame
                if frame.pts is None or frame.pts >= target - ticks / 2:
                    break
            if last is not None:
                frames.append(last.to_image())
        return frames, n_decoded


def expand_images(
    value: Any, base_dir: Path | None, max_frames: int, row_id: str, column: str, sizes: bool = False
) -> list[Any]:
    """An images cell → ordered RGB images. Lists stay in order; a folder is a video as sorted frames.

    sizes=True: their `ImageSize`s instead, read from the files' headers (a video's frames are decoded)."""
    one = image_size if sizes else open_image
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadRow("missing_image", row_id, column, "image list is empty")
        out = []
        for v in value:
            out.extend(expand_images(v, base_dir, max_frames, row_id, column, sizes))
        return out
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not frames:
                raise BadRow("missing_image", row_id, column, f"frame folder {path} holds no images")
            return [one(p, None, row_id, column) for p in sample_frames(frames, max_frames)]
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            decoded = video_frames(path, max_frames, row_id, column)
            return [ImageSize(f.width, f.height) for f in decoded] if sizes else decoded
    return [one(value, base_dir, row_id, column)]
