"""Idefics3 / SmolVLM image processing and prompt structure against transformers' (PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.inputs import make_images
from idefics_jax.data.image_tiles import TileImageProcessor
from idefics_jax.data.image_tokens import END_OF_UTTERANCE, FAKE_TOKEN, GLOBAL_IMAGE, IMAGE_TOKEN, expand_tiled_images, tile_tag

SIZES = {"idefics3": (4 * 364, 364), "smolvlm": (4 * 512, 512), "small": (4 * 56, 56)}


def reference(longest_edge: int, tile: int, split: bool):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                     do_image_splitting=split)


@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("split", [True, False])
def test_tiles_equal_the_reference(seed, sizes, split):
    """Odd images (1 px, extreme aspect ratios, palette, grey, alpha, CMYK, 16-bit, random sizes):
    pixels, masks, and the tile grids the prompt names."""
    longest_edge, tile = SIZES[sizes]
    ours, theirs = TileImageProcessor(longest_edge, tile, split), reference(longest_edge, tile, split)
    images = make_images(np.random.default_rng([seed, 70, split]))
    assert len(images) >= 20
    for i, image in enumerate(images[: 8 if sizes == "smolvlm" else None]):  # smolvlm's 2048 px: a few suffice
        ref = theirs(images=[[image]], return_tensors="np", return_row_col_info=True)
        got = ours([[image]])
        ref_pixels = np.moveaxis(ref["pixel_values"], 2, -1)
        assert got["pixel_values"].shape == ref_pixels.shape, (i, image.mode, image.size)
        np.testing.assert_allclose(got["pixel_values"], ref_pixels, atol=1e-5, rtol=0, err_msg=f"image {i} {image.mode}")
        np.testing.assert_array_equal(got["pixel_attention_mask"], ref["pixel_attention_mask"].astype(bool))
        assert (got["rows"].tolist(), got["cols"].tolist()) == (ref["rows"], ref["cols"]), i


def test_prompt_structure_equals_the_reference_processor(seed):
    """The expanded text of a two-image prompt (one split into tiles, one single tile) equals
    transformers' `Idefics3Processor`'s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics3Processor, PreTrainedTokenizerFast

    specials = [FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE] + [tile_tag(r, c) for r in range(1, 7)
                                                                           for c in range(1, 7)]
    vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", "look", "at", "this", *specials])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        additional_special_tokens=specials)
    longest_edge, tile = SIZES["small"]
    rng = np.random.default_rng([seed, 71])
    images = [rng.integers(0, 256, (int(rng.integers(20, 300)), int(rng.integers(20, 300)), 3), dtype=np.uint8)
              for _ in range(2)]
    text = f"look at {IMAGE_TOKEN} a b {IMAGE_TOKEN} this"
    for split in (True, False):  # tiles and a global image; one square each
        processor = Idefics3Processor(reference(longest_edge, tile, split), tokenizer, image_seq_len=3)
        _, replacements = processor._process_images([images], return_row_col_info=True)
        expected, _ = processor.get_text_with_replacements([text], images_replacements=replacements)
        got = TileImageProcessor(longest_edge, tile, split)([images])
        grids = list(zip(got["rows"][0].tolist(), got["cols"][0].tolist()))
        assert all(grid != (0, 0) for grid in grids) if split else grids == [(0, 0), (0, 0)]
        assert expand_tiled_images(text, grids, 3) == expected[0]
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        expand_tiled_images(text, grids[:1], 3)
