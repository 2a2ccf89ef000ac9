"""A `tokenizer.json` tokenizer (Idefics3's and SmolVLM's kind) against transformers' PreTrainedTokenizerFast."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from helpers.inputs import make_images
from idefics_jax.data.image_tokens import END_OF_UTTERANCE, FAKE_TOKEN, GLOBAL_IMAGE, IMAGE_TOKEN, tile_tag
from idefics_jax.data.json_tokenizer import JsonTokenizer, train_json_tokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE,
            *(tile_tag(r, c) for r in range(1, 7) for c in range(1, 7))]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, seed):
    """A byte-level BPE trained here on random words (Llama 3 / SmolLM2's kind), BOS added by its template."""
    rng = np.random.default_rng([seed, 80])
    words = ["".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9)))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    json_text = train_json_tokenizer(corpus, 600, SPECIALS, bos_token="<|begin_of_text|>")
    path = tmp_path_factory.mktemp("json_tokenizer")
    (path / "tokenizer.json").write_text(json_text)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}, "pad_token": "<|end_of_text|>"}))
    return path, words


def test_encodes_and_decodes_as_transformers(tokenizer_dir, seed):
    from transformers import PreTrainedTokenizerFast

    path, words = tokenizer_dir
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                     eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                                     additional_special_tokens=SPECIALS[2:])
    ours = JsonTokenizer(path / "tokenizer.json")
    rng = np.random.default_rng([seed, 81])
    texts = ["", " ", "héllo wörld ✓ 日本", f"User:{IMAGE_TOKEN}{IMAGE_TOKEN} what?{END_OF_UTTERANCE}\nAssistant:",
             f"{FAKE_TOKEN}{tile_tag(2, 3)}{IMAGE_TOKEN * 3}\n\n{FAKE_TOKEN}{GLOBAL_IMAGE}{IMAGE_TOKEN}{FAKE_TOKEN} x"]
    texts += [" ".join(rng.choice(words + SPECIALS, int(rng.integers(1, 20)))) for _ in range(30)]
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs) and ours.token_id(IMAGE_TOKEN) == theirs.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ours.encode("ab", add_eos=True)[-1] == ours.eos_id


def test_special_spellings_are_disarmed_pickled_and_errors_named(tokenizer_dir):
    path, _ = tokenizer_dir
    ours = JsonTokenizer(path / "tokenizer.json")
    image = ours.token_id(IMAGE_TOKEN)
    assert image in ours.encode(f"a {IMAGE_TOKEN}") and image not in ours.encode(ours.disarm(f"a {IMAGE_TOKEN}"))
    again = pickle.loads(pickle.dumps(ours))
    assert again.encode(f"x {IMAGE_TOKEN} y") == ours.encode(f"x {IMAGE_TOKEN} y") and again.bos_id == ours.bos_id
    with pytest.raises(KeyError, match="'<nope>' is not a token"):
        ours.token_id("<nope>")
    with pytest.raises(ValueError, match="bos token '<s>' is not in the vocabulary"):
        JsonTokenizer(json_text=(path / "tokenizer.json").read_text(), bos_token="<s>")


def test_tiled_processor_equals_idefics3s(tokenizer_dir, seed):
    """Prompts with tiled images, a single-tile image and none, and each of the odd images alone
    (`make_images`: 1 px, extreme aspect ratios, palette, grey, alpha, CMYK, 16-bit, ...), through
    our TiledProcessor and transformers' Idefics3Processor on the same tokenizer: the same token ids,
    masks and pixels."""
    from transformers import Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from idefics_jax.data.image_tiles import TileImageProcessor
    from idefics_jax.data.processor import TiledProcessor

    path, words = tokenizer_dir
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                                        additional_special_tokens=SPECIALS[2:])
    tokenizer.padding_side = "left"
    reference = Idefics3Processor(Idefics3ImageProcessorPil(size={"longest_edge": 112},
                                                            max_image_size={"longest_edge": 56}), tokenizer,
                                  image_seq_len=4)
    ours = TiledProcessor(JsonTokenizer(path / "tokenizer.json"), TileImageProcessor(112, 56), image_seq_len=4)
    rng = np.random.default_rng([seed, 82])
    image = lambda: rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3), dtype=np.uint8)
    texts = [f"User:{IMAGE_TOKEN}{' '.join(rng.choice(words, 3))}{END_OF_UTTERANCE}\nAssistant:",
             f"User: {' '.join(rng.choice(words, 5))} {IMAGE_TOKEN} and {IMAGE_TOKEN}?{END_OF_UTTERANCE}\nAssistant:"]
    images = [[image()], [image(), np.full((30, 40, 3), 200, np.uint8)]]
    expected = reference(text=texts, images=images, padding=True, return_tensors="np")
    got = ours(texts, images)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    np.testing.assert_allclose(got["pixel_values"], np.moveaxis(expected["pixel_values"], 2, -1), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["pixel_attention_mask"], expected["pixel_attention_mask"].astype(bool))
    for i, odd in enumerate(make_images(np.random.default_rng([seed, 83]))):  # each of the odd images alone
        text = f"User:{IMAGE_TOKEN}{rng.choice(words)}{END_OF_UTTERANCE}\nAssistant:"
        expected, got = reference(text=[text], images=[[odd]], return_tensors="np"), ours([text], [[odd]])
        np.testing.assert_array_equal(got["input_ids"], expected["input_ids"], err_msg=f"image {i}")
        np.testing.assert_allclose(got["pixel_values"], np.moveaxis(expected["pixel_values"], 2, -1), atol=1e-5,
                                   rtol=0, err_msg=f"image {i} {odd.mode} {odd.size}")
    text_only = ours(["User: hello"])
    assert "pixel_values" not in text_only and text_only["input_ids"][0, 0] == ours.tokenizer.bos_id
