"""Idefics2 image processing in numpy + PIL, equal to transformers' `Idefics2ImageProcessor`.

Per image (channels last throughout, the JAX convention):
  1. load and convert to RGB: transparency is composited onto white; grayscale, palette, CMYK
     and 16-bit images go through PIL's own conversion;
  2. optionally split into 4 crops (top-left, top-right, bottom-left, bottom-right halves) plus
     the whole image (transformers 5 splits before resizing);
  3. resize each with PIL bilinear so the longest edge is at most `longest_edge` (980) and both
     edges at least `shortest_edge` (378), by the reference's exact integer rule;
  4. rescale by 1/255 (in float64, stored as float32) and normalise with mean = std = 0.5.
A batch is zero-padded to its largest image, with a boolean pixel attention mask.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Sequence, Union

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from idefics_jax.paths import is_url

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]

# The most pixels an image may have (8000 x 8000; images are resized to at most 980 px anyway): a
# larger one is refused from its header, before it is decoded. PIL itself refuses more than twice
# its own `Image.MAX_IMAGE_PIXELS` (about 179M), whatever the limit here.
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be read or used (corrupt, truncated, empty, unsupported)."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the limit allows."""


def load_image(source: ImageLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A fully decoded PIL image from a path (local or gs://), encoded bytes, a PIL image or a uint8
    array. max_pixels: refuse a larger image (`ImageTooLarge`) before decoding it (None: no limit)."""
    name = "" if isinstance(source, (bytes, bytearray, np.ndarray, Image.Image)) else f" {str(source)[:200]}"
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[-1] not in (1, 3, 4)):
            raise ImageError(f"An image array must be uint8 [height, width(, 1|3|4)]; got {source.dtype} {source.shape}")
        image = Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source)
    else:
        if isinstance(source, (str, os.PathLike)) and is_url(source):  # gs://...: fetched whole (gcsfs)
            source = epath.Path(source).read_bytes()  # FileNotFoundError when missing, as for a local file
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except FileNotFoundError:
            raise
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(f"Image{name} is too large to decode: {error}") from error
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ImageError(f"Cannot read image{name or ' bytes'}: {error}") from error
    try:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLarge(f"Image{name} is {image.width}x{image.height} = {image.width * image.height:,} "
                                f"pixels, over the limit of {max_pixels:,} (max_image_pixels)")
        try:
            image.load()  # decode now: a truncated file fails here, not later
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageError(f"Cannot decode image{name}: {error}") from error
        if image.width == 0 or image.height == 0:
            raise ImageError(f"Image{name} has zero size ({image.width}x{image.height})")
    except ImageError:
        if image is not source:
            image.close()  # the file it was opened from
        raise
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image; transparency composited onto white (the reference's rule)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_output_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """The reference's rule: cap the longest edge (keeping the aspect ratio), then floor both edges."""
    aspect_ratio = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect_ratio)
    return max(height, shortest_edge), max(width, shortest_edge)


def split_image(image: Image.Image) -> list[Image.Image]:
    """4 crops (row-major quadrants, split at height // 2 and width // 2) + the whole image."""
    width, height = image.size
    if height < 2 or width < 2:
        raise ImageError(f"Image of {height}x{width} pixels is too small to split into 4 crops")
    h, w = height // 2, width // 2
    boxes = [(0, 0, w, h), (w, 0, width, h), (0, h, w, height), (w, h, width, height)]
    return [image.crop(box) for box in boxes] + [image]


@functools.lru_cache(maxsize=8)
def _normalizer(scale: float, mean: float, std: float):
    """A function uint8 -> float32 equal to the reference's arithmetic (x * scale in float64,
    then float32 `(x - mean) / std`) for every uint8 value: plain float32 arithmetic when it agrees
    on all 256 values (it does for 1/255, 0.5, 0.5), else a lookup table."""
    table = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    table = (table - np.float32(mean)) / np.float32(std)
    divisor, mean32, std32 = np.float32(1 / scale), np.float32(mean), np.float32(std)

    def arithmetic(x, out):  # in place in `out`: no temporaries the size of the image
        np.divide(x, divisor, out=out, dtype=np.float32)
        np.subtract(out, mean32, out=out)
        return np.divide(out, std32, out=out)

    all_values = np.arange(256, dtype=np.uint8)
    if np.array_equal(arithmetic(all_values, np.empty(256, np.float32)), table):
        return arithmetic
    return lambda x, out: np.take(table, x, out=out)


def normalize_uint8(image: np.ndarray, scale: float = 1 / 255, mean: float = 0.5, std: float = 0.5,
                    out: np.ndarray | None = None) -> np.ndarray:
    """uint8 array -> float32, bit-identical to rescale-then-normalise; written into `out` (a float32
    array of the image's shape, or a view into a larger one) when given."""
    if image.dtype != np.uint8:
        raise TypeError(f"normalize_uint8 takes uint8 pixels, got {image.dtype}")
    return _normalizer(scale, mean, std)(image, np.empty(image.shape, np.float32) if out is None else out)


IMAGE_SIZINGS = ("keep_aspect", "square")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    longest_edge: int = 980
    shortest_edge: int = 378
    do_image_splitting: bool = False
    image_mean: float = 0.5
    image_std: float = 0.5
    rescale_factor: float = 1 / 255
    max_pixels: int | None = MAX_IMAGE_PIXELS  # a larger image is refused before decoding (`load_image`)
    # "keep_aspect" (Idefics2: the longest edge capped, the aspect ratio kept) or "square" (every
    # image, and every crop, resized to longest_edge x longest_edge: the paper's square-resize ablation)
    image_sizing: str = "keep_aspect"

    def __post_init__(self):
        if self.image_sizing not in IMAGE_SIZINGS:
            raise ValueError(f"image_sizing '{self.image_sizing}' is not one of {IMAGE_SIZINGS}")

    def resize(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> uint8 `[h', w', 3]`, resized with PIL bilinear by the reference's rule
        (or to a `longest_edge` square)."""
        if self.image_sizing == "square":
            new_height = new_width = self.longest_edge
        else:
            new_height, new_width = resize_output_size(image.height, image.width, self.shortest_edge,
                                                       self.longest_edge)
        if (new_height, new_width) != (image.height, image.width):
            image = image.resize((new_width, new_height), resample=Image.BILINEAR)
        return np.asarray(image)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 -> float32 `(x / 255 - mean) / std`, rounded as the reference rounds it."""
        return normalize_uint8(image, self.rescale_factor, self.image_mean, self.image_std)

    def process_uint8(self, source: ImageLike) -> list[np.ndarray]:
        """One image -> 1 (or 5 with splitting) resized uint8 arrays `[height, width, 3]`.

        The data pipeline ships these (4x smaller than float32) and normalises whole batches."""
        rgb = to_rgb(load_image(source, self.max_pixels))
        crops = split_image(rgb) if self.do_image_splitting else [rgb]
        return [self.resize(crop) for crop in crops]

    def process_image(self, source: ImageLike) -> list[np.ndarray]:
        """One image -> 1 (or 5 with splitting) float32 arrays `[height, width, 3]`, unpadded."""
        return [self.normalize(crop) for crop in self.process_uint8(source)]

    def __call__(self, images: Sequence[Sequence[ImageLike]]) -> dict[str, np.ndarray]:
        """A batch: `images[b]` are row b's images. Returns `pixel_values` float32
        `[batch, max_images, max_h, max_w, 3]` and `pixel_attention_mask` bool
        `[batch, max_images, max_h, max_w]`; missing images are all-zero slots."""
        processed = [[crop for image in row for crop in self.process_image(image)] for row in images]
        return pad_images(processed)


def pad_images(rows: Sequence[Sequence[np.ndarray]], max_images: int | None = None,
               size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Zero-pads processed images `[h, w, 3]` into one batch with a pixel attention mask."""
    sizes = [image.shape[:2] for row in rows for image in row]
    max_images = max_images if max_images is not None else max([len(row) for row in rows] + [1])
    if size is None:
        size = (max([h for h, _ in sizes] + [1]), max([w for _, w in sizes] + [1]))
    height, width = size
    pixel_values = np.zeros((len(rows), max_images, height, width, 3), np.float32)
    pixel_mask = np.zeros((len(rows), max_images, height, width), bool)
    for b, row in enumerate(rows):
        if len(row) > max_images:
            raise ValueError(f"Row {b} has {len(row)} images; at most {max_images} fit")
        for i, image in enumerate(row):
            h, w = image.shape[:2]
            if h > height or w > width:
                raise ValueError(f"Image {i} of row {b} is {h}x{w}, larger than the padded size {height}x{width}")
            pixel_values[b, i, :h, :w] = image
            pixel_mask[b, i, :h, :w] = True
    return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}
