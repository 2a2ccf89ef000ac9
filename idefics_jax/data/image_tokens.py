"""The image-token arithmetic, in one place: the processor and the packer use it.

A prompt image becomes `<fake_token_around_image>` + `image_seq_len` x `<image>` +
`<fake_token_around_image>`; with image splitting it becomes 5 such groups (4 crops + the whole
image), each a separate image for the model. Adjacent groups share one fake token, exactly as
transformers' `Idefics2Processor` writes them. Idefics3 and SmolVLM name each tile of an image
instead (`expand_tiled_images`).
"""

from __future__ import annotations

import re

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
ADDED_TOKENS = (FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE)  # appended to the vocabulary in this order

_CLOSING_FAKE = re.compile(rf"{re.escape(FAKE_TOKEN)}(?=[^\s<])")


def model_images_per_image(do_image_splitting: bool) -> int:
    """Images the model encodes per prompt image: 4 crops + the whole image when splitting."""
    return 5 if do_image_splitting else 1


def expand_image_placeholders(text: str, image_seq_len: int, do_image_splitting: bool) -> str:
    """Replaces each `<image>` placeholder by its fake-token-delimited run of image tokens."""
    group = f"{FAKE_TOKEN}{IMAGE_TOKEN * image_seq_len}{FAKE_TOKEN}" * model_images_per_image(do_image_splitting)
    text = text.replace(IMAGE_TOKEN, group)
    text = text.replace(f"{FAKE_TOKEN}{FAKE_TOKEN}", FAKE_TOKEN)  # adjacent images share a fake token
    return _CLOSING_FAKE.sub(f"{FAKE_TOKEN} ", text)  # a word right after an image starts a new word


GLOBAL_IMAGE = "<global-img>"


TILE_TAG = re.compile(r"<row_\d+_col_\d+>")  # any tile's tag


def tile_tag(row: int, col: int) -> str:
    """Idefics3's name of the tile in row `row`, column `col` (from 1; `<row_1_col_1>` to `<row_6_col_6>`)."""
    return f"<row_{row}_col_{col}>"


def expand_tiled_image(rows: int, cols: int, image_seq_len: int) -> str:
    """The prompt of an image cut into `rows x cols` tiles (0 x 0: one global image), as transformers'
    `Idefics3Processor` writes it: each tile's tag and tokens, a newline after each row of tiles, then
    a blank line and the global image's tokens between fake tokens."""
    tokens = IMAGE_TOKEN * image_seq_len
    whole = f"{FAKE_TOKEN}{GLOBAL_IMAGE}{tokens}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return whole
    grid = "".join("".join(f"{FAKE_TOKEN}{tile_tag(r + 1, c + 1)}{tokens}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{whole}"


def expand_tiled_images(text: str, grids, image_seq_len: int) -> str:
    """Replaces the k-th `<image>` placeholder of `text` by the prompt of an image of `grids[k]`
    (rows, cols) tiles."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(grids):
        raise ValueError(f"{len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) but {len(grids)} image(s)")
    out = [pieces[0]]
    for (rows, cols), piece in zip(grids, pieces[1:]):
        out += [expand_tiled_image(rows, cols, image_seq_len), piece]
    return "".join(out)


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_TOKEN)
