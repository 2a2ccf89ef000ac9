"""A `tokenizer.json` tokenizer (Idefics3's and SmolVLM's kind) against transformers' PreTrainedTokenizerFast."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from idefics_jax.data.image_tokens import END_OF_UTTERANCE, FAKE_TOKEN, GLOBAL_IMAGE, IMAGE_TOKEN, tile_tag
from idefics_jax.data.json_tokenizer import JsonTokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE,
            *(tile_tag(r, c) for r in range(1, 7) for c in range(1, 7))]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, seed):
    """A byte-level BPE trained here on random words (Llama 3 / SmolLM2's kind), BOS added by its template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng([seed, 80])
    words = ["".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9)))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    path = tmp_path_factory.mktemp("json_tokenizer")
    backend.save(str(path / "tokenizer.json"))
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
