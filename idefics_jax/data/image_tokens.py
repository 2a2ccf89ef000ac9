"""The image-token arithmetic, in one place: the processor and the packer use it.

A prompt image becomes `<fake_token_around_image>` + `image_seq_len` x `<image>` +
`<fake_token_around_image>`; with image splitting it becomes 5 such groups (4 crops + the whole
image), each a separate image for the model. Adjacent groups share one fake token, exactly as
transformers' `Idefics2Processor` writes them.
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


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_TOKEN)
