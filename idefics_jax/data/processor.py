"""The Idefics2 processor: prompts and images -> model inputs, and the chat format.

    processor = Processor(Tokenizer("tokenizer.model"), ImageProcessor(), image_seq_len=64)
    batch = processor(["User:<image>What is written here?<end_of_utterance>\\nAssistant:"], [[image]])
    # input_ids / attention_mask [batch, seq] (left padded), pixel_values [batch, images, h, w, 3],
    # pixel_attention_mask [batch, images, h, w]

Chat format (Idefics2's template): each turn is `Role:` (then a space unless the turn opens
with an image) + its text and `<image>` placeholders + `<end_of_utterance>\\n`; a generation
prompt ends with `Assistant:`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from idefics_jax.data.image_processing import ImageLike, ImageProcessor
from idefics_jax.data.image_tiles import TileImageProcessor
from idefics_jax.data.image_tokens import (
    END_OF_UTTERANCE,
    FAKE_TOKEN,
    GLOBAL_IMAGE,
    IMAGE_TOKEN,
    TILE_TAG,
    count_placeholders,
    expand_image_placeholders,
    expand_tiled_images,
)
from idefics_jax.data.tokenizer import Tokenizer

Message = Mapping[str, Any]  # {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}


# The chat formats, by the model type that uses each, and what a prompt opens with: Idefics2's
# template, Idefics3's (the same after Llama 3's `<|begin_of_text|>`, as its checkpoint's
# chat_template.json writes it) and SmolVLM's (after `<|im_start|>`, transformers' `SmolVLMProcessor`
# default template).
CHAT_FORMATS = {"idefics2": "", "idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}


def check_chat_format(chat_format: str) -> str:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format {chat_format!r} is not one of {tuple(CHAT_FORMATS)}")
    return chat_format


def render_turn(message: Message, chat_format: str = "idefics2") -> str:
    """One chat turn as Idefics2's template writes it (Idefics3's and SmolVLM's write turns alike).
    Content is a list of parts, or a string whose `<image>` placeholders stand for image parts (our
    records' form: written as the template writes those parts). An assistant turn may be the empty
    string (a model may answer nothing at all: "Assistant: <end_of_utterance>", as the template
    writes an empty text part); other turns need content."""
    content = message["content"]
    if not content and not (content == "" and message["role"] == "assistant"):
        raise ValueError(f"A {message['role']!r} turn has no content")
    if isinstance(content, str):
        opens_with_image = content.startswith(IMAGE_TOKEN)
        content = [{"type": "text", "text": content}]
    else:
        opens_with_image = content[0]["type"] == "image"
    head = str(message["role"]).capitalize() + (":" if opens_with_image else ": ")
    body = []
    for part in content:
        if part["type"] == "text":
            body.append(part["text"])
        elif part["type"] == "image":
            body.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"Unknown content type {part['type']!r} (expected 'text' or 'image')")
    return head + "".join(body) + END_OF_UTTERANCE + "\n"


# The Jinja chat template of HuggingFaceM4/idefics2-8b's processor, which `apply_chat_template` renders
# the same (tests/test_processor.py); for transformers' `Idefics2Processor(chat_template=...)`.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def apply_chat_template(messages: Sequence[Message], add_generation_prompt: bool = False,
                        chat_format: str = "idefics2") -> str:
    """The chat as Idefics2's template writes it, or Idefics3's or SmolVLM's (`CHAT_FORMATS`)."""
    return (CHAT_FORMATS[check_chat_format(chat_format)] + "".join(render_turn(m, chat_format) for m in messages)
            + ("Assistant:" if add_generation_prompt else ""))


class Processor:
    """Idefics2's processor. With `TiledProcessor` it is what the pipeline, the assistant and
    evaluation call: `read_image(source)` -> (the model's images, the image's tile grid, None here),
    `expand(text, grids)` / `encode_prompt(text, grids)` with one grid per `<image>`,
    `apply_chat_template(messages)` in its `chat_format`."""

    tiled = False  # whether an image's prompt depends on its size (Idefics3's tiles)

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor | None = None, image_seq_len: int = 64,
                 chat_format: str = "idefics2"):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.image_seq_len = image_seq_len
        self.chat_format = check_chat_format(chat_format)
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)

    def with_splitting(self, split: bool) -> "Processor":
        """The same processor, images split (crops, tiles) or not."""
        images = dataclasses.replace(self.image_processor, do_image_splitting=split)
        return type(self)(self.tokenizer, images, self.image_seq_len, self.chat_format)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return apply_chat_template(messages, add_generation_prompt, self.chat_format)

    def render_turn(self, message: Message) -> str:
        return render_turn(message, self.chat_format)

    def read_image(self, source: ImageLike, *, uint8: bool = False) -> tuple[list[np.ndarray], Any]:
        """(the model's images of one image: itself, or 4 crops + itself; uint8 or normalised, None)."""
        images = self.image_processor
        return (images.process_uint8(source) if uint8 else images.process_image(source)), None

    def grids(self, images: Sequence) -> list:
        """The tile grids of loaded images (PIL or arrays) for `expand`: none here."""
        return [None] * len(images)

    def image_prompt_mask(self, ids: np.ndarray) -> np.ndarray:
        """bool `[n]`: the tokens of `ids` that only an image's prompt writes (never a text's target)."""
        return np.isin(ids, [self.tokenizer.token_id(FAKE_TOKEN), self.image_token_id])

    def expand(self, text: str, grids: Sequence | None = None) -> str:
        return expand_image_placeholders(text, self.image_seq_len, self.image_processor.do_image_splitting)

    def encode_prompt(self, text: str, grids: Sequence | None = None) -> list[int]:
        return self.tokenizer.encode(self.expand(text, grids))

    def __call__(self, text: str | Sequence[str], images: Sequence[Sequence[ImageLike]] | None = None,
                 padding_side: str = "left") -> dict[str, np.ndarray]:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode_prompt(t) for t in texts]
        wanted = [count_placeholders(t) for t in texts]
        given = [len(r) for r in images] if images is not None else [0] * len(texts)
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} lists of images")
        for i, (w, g) in enumerate(zip(wanted, given)):
            if w != g:
                raise ValueError(f"Prompt {i} has {w} {IMAGE_TOKEN} placeholder(s) but {g} image(s) were given")
        out = padded_ids(rows, self.tokenizer.pad_id, padding_side)
        if images is not None and any(given):
            out.update(self.image_processor(images))
        return out


def padded_ids(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left") -> dict[str, np.ndarray]:
    """Token rows as one batch: `input_ids` and `attention_mask` int32 `[batch, longest]`."""
    seq = max(len(r) for r in rows)
    input_ids = np.full((len(rows), seq), pad_id, np.int32)
    attention_mask = np.zeros((len(rows), seq), np.int32)
    for b, row in enumerate(rows):
        span = slice(seq - len(row), seq) if padding_side == "left" else slice(0, len(row))
        input_ids[b, span] = row
        attention_mask[b, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class TiledProcessor(Processor):
    """Idefics3's and SmolVLM's processor: each image cut into tiles (`TileImageProcessor`) and its
    `<image>` placeholder replaced by the tiles' prompt (`expand_tiled_images`), as transformers'
    `Idefics3Processor` / `SmolVLMProcessor` do; `image_seq_len` tokens per tile (the model config's).

        processor = TiledProcessor(JsonTokenizer("tokenizer.json"), TileImageProcessor(2048, 512), 64)
        batch = processor(["User:<image>What is this?<end_of_utterance>\\nAssistant:"], [[image]])
    """

    tiled = True

    def __init__(self, tokenizer, image_processor: TileImageProcessor, image_seq_len: int,
                 chat_format: str = "idefics3"):
        super().__init__(tokenizer, image_processor, image_seq_len, chat_format)
        # the global image's and the tiles' tags (`image_prompt_mask`, per training sample: found once)
        self._tag_ids = [i for token, i in tokenizer.special_tokens.items()
                         if token == GLOBAL_IMAGE or TILE_TAG.fullmatch(token)]

    def read_image(self, source: ImageLike, *, uint8: bool = False) -> tuple[list[np.ndarray], tuple[int, int]]:
        """(the image's tiles then the whole image, uint8 or normalised; its (rows, cols) of tiles)."""
        images = self.image_processor
        tiles, rows, cols = images.process_uint8(source) if uint8 else images.process_image(source)
        return tiles, (rows, cols)

    def grids(self, images: Sequence) -> list[tuple[int, int]]:
        """The (rows, cols) of tiles of loaded images (PIL or arrays `[h, w, 3]`), from their sizes."""
        sizes = [(image.height, image.width) if hasattr(image, "height") else np.shape(image)[:2] for image in images]
        return [self.image_processor.grid(h, w) for h, w in sizes]

    def image_prompt_mask(self, ids: np.ndarray) -> np.ndarray:
        """Also the global image's and the tiles' tags, and the line breaks after each row of tiles
        (the whitespace between two such tokens)."""
        mask = super().image_prompt_mask(ids) | np.isin(ids, self._tag_ids)
        edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1  # where each run after the first starts
        starts, ends = edges[mask[edges - 1]], edges[~mask[edges - 1]]  # text after / before a prompt's token
        ends = ends[ends > starts[0]] if len(starts) else ends
        for start, end in zip(starts, ends):  # each run of text between two of a prompt's tokens
            if not self.tokenizer.decode(ids[start:end]).strip():
                mask[start:end] = True
        return mask

    def expand(self, text: str, grids: Sequence | None = None) -> str:
        return expand_tiled_images(text, list(grids or []), self.image_seq_len)

    def __call__(self, text: str | Sequence[str], images: Sequence[Sequence[ImageLike]] | None = None,
                 padding_side: str = "left") -> dict[str, np.ndarray]:
        texts = [text] if isinstance(text, str) else list(text)
        images = [[] for _ in texts] if images is None else images
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} lists of images")
        pixels = self.image_processor(images) if any(images) else {}
        grids = [list(zip(pixels["rows"][b, :len(row)], pixels["cols"][b, :len(row)])) if row else []
                 for b, row in enumerate(images)]
        rows = [self.encode_prompt(t, grid) for t, grid in zip(texts, grids)]
        out = padded_ids(rows, self.tokenizer.pad_id, padding_side)
        out.update({k: v for k, v in pixels.items() if k not in ("rows", "cols")})
        return out


def make_processor(tokenizer, image_processor: ImageProcessor | TileImageProcessor, image_seq_len: int,
                   chat_format: str = "idefics2") -> Processor:
    """The processor of an image processor's kind: tiles (Idefics3, SmolVLM) or Idefics2's."""
    cls = TiledProcessor if isinstance(image_processor, TileImageProcessor) else Processor
    return cls(tokenizer, image_processor, image_seq_len, chat_format)


def check_tokenizer(tokenizer, config, name: str):
    """A clear error when `tokenizer` (called `name`) was not made for the model of `config`."""
    if tokenizer.token_id(IMAGE_TOKEN) != config.image_token_id:
        raise ValueError(f"The tokenizer {name} gives {IMAGE_TOKEN} the id {tokenizer.token_id(IMAGE_TOKEN)} but the "
                         f"model expects {config.image_token_id}: they were not made for each other")
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(f"The tokenizer {name} has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                         f"of {config.text.vocab_size} (config.model.text.vocab_size)")
