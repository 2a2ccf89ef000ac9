"""Records -> encoded samples (token ids, a target mask, resized images).

A record is a dict (one line of a jsonl file, one ArrayRecord entry, one TFDS example):

    {"id": "...", "type": "pair",         "image": "img/0.png", "text": "a caption"}
    {"id": "...", "type": "document",     "image": "pages/3.png", "text": "the page's text"}
    {"id": "...", "type": "interleaved",  "content": [{"type": "text", "text": "..."},
                                                      {"type": "image", "image": "img/1.png"}, ...]}
    {"id": "...", "type": "conversation", "images": ["img/2.png"],
     "messages": [{"role": "user", "content": "<image>What is written here?"},
                  {"role": "assistant", "content": "hello"}]}

Image references are paths relative to the dataset directory, or keys of the record's embedded
`_image_bytes` map (ArrayRecord / TFDS). Pre-training records (pair, document, interleaved) are
trained on every text token (the end-of-sequence token included); conversations only on the
assistant's answers and their `<end_of_utterance>`.

An encoded sample is a dict: `input_ids` int32 [n], `targets` bool [n] (token t is predicted),
`images` a list of uint8 [h, w, 3] arrays (crops included, in prompt order), `id`, `source`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

from idefics_jax.data.image_processing import ImageError, ImageTooLarge
from idefics_jax.data.image_tokens import IMAGE_TOKEN, count_placeholders
from idefics_jax.data.processor import CHAT_FORMATS, Processor

RECORD_TYPES = ("pair", "document", "interleaved", "conversation")


class SampleError(ValueError):
    """A record that cannot become a training sample; `reason` is a short category for counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def record_place(record) -> str:
    """A record's id and place (the file and line, or the shard's entry its source noted), for messages."""
    if not isinstance(record, Mapping):
        return "?"
    name, at = str(record.get("id", "?")), record.get("_at")
    return name if at in (None, name) else f"{name} ({at})"


def source_error(record) -> SampleError | None:
    """The error of a record its source could not read (`sources.invalid`: its reason and message),
    or None for a record to encode."""
    if isinstance(record, Mapping) and record.get("type") == "_invalid":
        return SampleError(record.get("_reason", "bad_record"), record.get("_error", "invalid record"))
    return None


@dataclasses.dataclass
class SampleEncoder:
    """Turns records of one source into encoded samples."""

    processor: Processor
    base_dir: str = ""
    max_length: int = 2048
    source: str = ""

    def read_image(self, record: Mapping[str, Any], ref: str) -> tuple[list[np.ndarray], Any]:
        """(an image's uint8 arrays for the model, its tile grid: `Processor.read_image`)."""
        if not isinstance(ref, str):
            raise SampleError("bad_record", f"an image reference must be a string, got {type(ref).__name__}")
        embedded = record.get("_image_bytes") or {}
        source = embedded[ref] if ref in embedded else os.path.join(self.base_dir, ref)
        if not isinstance(source, (bytes, str, Image.Image)):  # a decoded image: a page rendered from a PDF
            raise SampleError("bad_record", f"image '{ref}': embedded as {type(source).__name__}, not bytes")
        try:
            return self.processor.read_image(source, uint8=True)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise SampleError("missing_file", f"image '{ref}' not found: {error}") from error
        except ImageTooLarge as error:
            raise SampleError("image_too_large", f"image '{ref}': {error}") from error
        except ImageError as error:
            raise SampleError("bad_image", f"image '{ref}': {error}") from error

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise SampleError("bad_record", f"a record must be a JSON object, got {type(record).__name__}")
        if error := source_error(record):
            raise error
        kind = record.get("type")
        if kind not in RECORD_TYPES:
            raise SampleError("bad_record", f"record type {kind!r} is not one of {RECORD_TYPES}")
        try:
            if kind == "conversation":
                pieces, image_refs = self._conversation(record)
            else:
                pieces, image_refs = self._document(record, kind)
            # a tiled image's prompt names its tiles: the images are read first (else after the length check)
            images = [self.read_image(record, ref) for ref in image_refs] if self.processor.tiled else None
            grids = [grid for _, grid in images] if images else [None] * len(image_refs)
            tokens, targets = self._tokenize(pieces, grids, pretraining=kind != "conversation")
        except (KeyError, TypeError, AttributeError, IndexError) as error:  # a field missing or of the wrong type
            raise SampleError("bad_record", f"malformed {kind} record: missing or wrong field "
                                            f"({type(error).__name__}: {error})") from error
        if len(tokens) > self.max_length:
            raise SampleError("too_long", f"{len(tokens)} tokens > max_length {self.max_length}")
        if images is None:
            images = [self.read_image(record, ref) for ref in image_refs]
        return {"input_ids": tokens, "targets": targets, "images": [array for arrays, _ in images for array in arrays],
                "id": str(record.get("id", "")), "source": self.source}

    # -- prompt building ---------------------------------------------------------------------
    def _document(self, record, kind) -> tuple[list[tuple[str, bool]], list[str]]:
        if kind in ("pair", "document"):
            content = [{"type": "image", "image": record["image"]}, {"type": "text", "text": record["text"]}]
        else:
            content = record["content"]
        text, refs = [], []
        for part in content:
            if part["type"] == "image":
                text.append(IMAGE_TOKEN)
                refs.append(part["image"])
            elif part["type"] == "text":
                if IMAGE_TOKEN in part["text"]:
                    raise SampleError("image_count_mismatch", "a text part contains an <image> placeholder")
                text.append(part["text"])
            else:
                raise SampleError("bad_record", f"content part type {part['type']!r}")
        return [("".join(text) + self.processor.tokenizer.eos_token, True)], refs

    def _conversation(self, record) -> tuple[list[tuple[str, bool]], list[str]]:
        """The chat template's text in pieces (text, is a target): the assistant's answers and their
        `<end_of_utterance>` are the targets."""
        refs = list(record.get("images") or [])
        pieces: list[tuple[str, bool]] = [(CHAT_FORMATS[self.processor.chat_format], False)]
        placeholders = 0
        for message in record["messages"]:
            if not isinstance(message["content"], str) or not isinstance(message["role"], str):
                raise SampleError("bad_record", "a conversation message's role and content must be strings")
            placeholders += count_placeholders(message["content"])
            try:
                text = self.processor.render_turn(message)
            except ValueError as error:  # a turn without content
                raise SampleError("bad_record", str(error)) from error
            if message["role"] == "assistant":
                if IMAGE_TOKEN in message["content"]:
                    raise SampleError("bad_record", "an assistant turn contains an <image>")
                head = len("Assistant:")  # then " answer<end_of_utterance>" (the target), then "\n"
                pieces += [(text[:head], False), (text[head:-1], True), (text[-1:], False)]
            else:
                pieces.append((text, False))
        if placeholders != len(refs):
            raise SampleError("image_count_mismatch",
                              f"{placeholders} <image> placeholder(s) in the messages but {len(refs)} image(s)")
        if not any(target for _, target in pieces):
            raise SampleError("bad_record", "a conversation without an assistant answer has nothing to learn")
        return pieces, refs

    def _tokenize(self, pieces, grids, pretraining: bool):
        """Each piece encoded as a continuation of the ones before, with the grids of its images."""
        tokenizer = self.processor.tokenizer
        ids = tokenizer.encode("", add_bos=True)  # the tokenizer's start: its BOS, if it adds one
        targets = [False] * len(ids)
        pieces = [(text, target) for text, target in pieces if text]
        for i, (text, target) in enumerate(pieces):
            n = count_placeholders(text)
            piece_ids = tokenizer.encode(self.processor.expand(text, grids[:n]), add_bos=False, at_start=i == 0)
            grids = grids[n:]
            ids += piece_ids
            targets += [target] * len(piece_ids)
        tokens = np.asarray(ids, np.int32)
        targets = np.asarray(targets, bool)
        if pretraining:  # never predict what only an image's prompt writes
            targets &= ~self.processor.image_prompt_mask(tokens)
        return tokens, targets
