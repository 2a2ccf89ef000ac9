"""Idefics3 / SmolVLM image processing in numpy + PIL, equal to transformers' `Idefics3ImageProcessorPil`
(SmolVLM's is the same with other sizes).

Per image (channels last throughout):
  1. load and convert to RGB (as for Idefics2: `image_processing.to_rgb`);
  2. resize with PIL Lanczos so that the longest edge is `longest_edge` (up or down; an odd other
     edge rounded up to even), and both at most 4096;
  3. with splitting: resize again so both edges are multiples of the tile side (`tile`, the vision
     tower's image size), cut it into `rows x cols` tiles in row-major order, and add the whole
     image resized to one tile (the global image); an image that fits one tile is that tile alone
     (rows = cols = 0). Without splitting: one tile-sized square;
  4. rescale by 1/255 and normalise with mean = std = 0.5.
The prompt of an image then names each tile (`image_tokens.expand_tiled_image`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from idefics_jax.data.image_processing import (MAX_IMAGE_PIXELS, ImageLike, load_image, normalize_uint8, pad_images,
                                               resize_output_size, to_rgb)

MAX_SIDE = 4096  # the reference's absolute limit on either edge after the first resize


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The reference's first resize: the longest edge to `longest_edge`, the other kept in proportion
    (floored, then rounded up to even), both at least 1; then both capped at `MAX_SIDE`."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    # then Idefics2's rule: the longest edge capped at MAX_SIDE, in proportion, both at least 1
    return resize_output_size(max(height, 1), max(width, 1), 1, MAX_SIDE)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """The reference's resize for the vision encoder: the longest edge up to a multiple of `tile`, the
    other in proportion, then up to a multiple of `tile` too."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def resized(image: Image.Image, height: int, width: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


@dataclasses.dataclass(frozen=True)
class TileImageProcessor:
    """Idefics3's processor (`longest_edge` 4 x 364, `tile` 364); SmolVLM's take 4 x 512 and 512."""

    longest_edge: int = 4 * 364
    tile: int = 364
    do_image_splitting: bool = True
    image_mean: float = 0.5
    image_std: float = 0.5
    rescale_factor: float = 1 / 255
    max_pixels: int | None = MAX_IMAGE_PIXELS

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles an image of `height x width` is cut into; (0, 0): one tile."""
        if not self.do_image_splitting:
            return 0, 0
        height, width = tile_multiple_size(*longest_edge_size(height, width, self.longest_edge), self.tile)
        return (0, 0) if height <= self.tile and width <= self.tile else (height // self.tile, width // self.tile)

    def process_uint8(self, source: ImageLike) -> tuple[list[np.ndarray], int, int]:
        """One image -> (its tiles then its global image, uint8 `[tile, tile, 3]` each; rows; cols)."""
        image = to_rgb(load_image(source, self.max_pixels))
        rows, cols = self.grid(image.height, image.width)
        image = resized(image, *longest_edge_size(image.height, image.width, self.longest_edge))
        if rows == cols == 0:  # a tile-sized square (the reference resizes to the one-tile multiple)
            return [np.asarray(resized(image, self.tile, self.tile))], 0, 0
        image = resized(image, rows * self.tile, cols * self.tile)
        tiles = [np.asarray(image.crop((c * self.tile, r * self.tile, (c + 1) * self.tile, (r + 1) * self.tile)))
                 for r in range(rows) for c in range(cols)]
        return tiles + [np.asarray(resized(image, self.tile, self.tile))], rows, cols

    def process_image(self, source: ImageLike) -> tuple[list[np.ndarray], int, int]:
        """As `process_uint8`, normalised to float32."""
        tiles, rows, cols = self.process_uint8(source)
        return [normalize_uint8(t, self.rescale_factor, self.image_mean, self.image_std) for t in tiles], rows, cols

    def __call__(self, images: Sequence[Sequence[ImageLike]]) -> dict[str, np.ndarray]:
        """A batch: `images[b]` are row b's images. Returns `pixel_values` float32 `[batch, tiles,
        height, width, 3]`, `pixel_attention_mask` bool (zero-padded to the batch's most tiles and
        largest size), and `rows` / `cols` int `[batch, images]` (0 where an image is one tile)."""
        processed = [[self.process_image(image) for image in row] for row in images]
        batch = pad_images([[tile for tiles, _, _ in row for tile in tiles] for row in processed])
        width = max([len(row) for row in processed] + [1])
        grid = lambda k: np.array([[p[k] for p in row] + [0] * (width - len(row)) for row in processed], np.int64)
        return {**batch, "rows": grid(1), "cols": grid(2)}
