"""Published datasets' rows -> our records (`samples.py`), by schema.

* `the_cauldron` (HuggingFaceM4/the_cauldron, one config per subset) and `docmatix`
  (HuggingFaceM4/Docmatix) share a schema: `images`, a list of `{bytes, path}` images, and `texts`,
  a list of `{user, assistant, source}` turns. A row becomes one conversation: its images lead the
  first user turn (as Idefics2's fine-tuning placed them), and several Q/A pairs on the same images
  become a multi-turn conversation; the loss is on the answers only.
* `pairs`: image-caption pairs, one per row: an image column (a `{bytes, path}` struct as `datasets`
  stores images, raw bytes, or a path relative to the source's directory) and a caption column,
  named in the source's config or found among the usual names (`IMAGE_COLUMNS`, `TEXT_COLUMNS`).

* `obelics` (HuggingFaceM4/OBELICS): `images` (URLs or null) and `texts` (strings or null), aligned
  position by position (each position an image or a text), with `metadata` and `general_metadata`
  JSON strings. A row becomes an interleaved document, consecutive texts joined as paragraphs
  (blank lines) and each image fetched by URL from the source's image store (`image_store.py`). An
  image the store lacks skips the document, naming the image and why (`missing_images="skip"`), or
  is left out of the document (`"drop"`; a document left without images still trains its text).

* `pdfa` (pixparse/pdfa-eng-wds, WebDataset shards): a `.pdf` and a `.json` of OCR per sample
  (`{"pages": [{"lines": {"text": [...]}, ...}]}`); each page becomes a document record, the page
  rendered at the source's DPI (pypdfium2) and its OCR lines as the text.

`detect_schema(names)` tells the schema from a table's column names where it can; `to_record(schema,
row, where, options)` adapts one row (a dict, as pyarrow's `to_pylist` gives it), raising
`SchemaError` naming the problem for a row that does not fit. `options` carries what a schema needs
beyond the row: the `pairs` columns, OBELICS's image store and its `missing_images` policy.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Iterable, Mapping

from idefics_jax.data.image_store import MissingImage
from idefics_jax.data.image_tokens import IMAGE_TOKEN


class SchemaError(ValueError):
    """A row that does not fit its dataset's published schema; `reason` is a short category for counts."""

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SchemaError(f"{what} is {'empty' if isinstance(value, str) else type(value).__name__}, not text")
    return value


IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img")  # the names `pairs` looks for, in this order
TEXT_COLUMNS = ("caption", "text", "txt", "alt_text")


def cauldron_record(row: Mapping[str, Any], where: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A The Cauldron / Docmatix row -> a conversation record, its images embedded."""
    images, texts = row.get("images"), row.get("texts")
    if not isinstance(images, list) or not isinstance(texts, list):
        raise SchemaError("a row has `images` and `texts` lists")
    if not texts:
        raise SchemaError("`texts` is empty: no question to learn from")
    refs, embedded = [], {}
    for i, image in enumerate(images):
        data = image.get("bytes") if isinstance(image, Mapping) else None
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise SchemaError(f"images[{i}] has no bytes")
        refs.append(f"image_{i}")
        embedded[refs[-1]] = bytes(data)
    messages = []
    for i, turn in enumerate(texts):
        if not isinstance(turn, Mapping):
            raise SchemaError(f"texts[{i}] is {type(turn).__name__}, not a {{user, assistant}} turn")
        question = _text(turn.get("user"), f"texts[{i}].user")
        if IMAGE_TOKEN in question:
            raise SchemaError(f"texts[{i}].user spells {IMAGE_TOKEN}")
        messages += [{"role": "user", "content": (IMAGE_TOKEN * len(refs) if i == 0 else "") + question},
                     {"role": "assistant", "content": _text(turn.get("assistant"), f"texts[{i}].assistant")}]
    source = texts[0].get("source") if isinstance(texts[0], Mapping) else None
    return {"id": f"{source}/{where}" if isinstance(source, str) and source else where, "type": "conversation",
            "images": refs, "messages": messages, "_image_bytes": embedded}


def pair_record(row: Mapping[str, Any], where: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """An image-caption row -> a pair record (the image embedded, or its path)."""
    image_column, text_column = options["image"], options["text"]
    image = row.get(image_column)
    if isinstance(image, Mapping):
        data, path = image.get("bytes"), image.get("path")
    elif isinstance(image, (bytes, bytearray, str)):
        data, path = (None, image) if isinstance(image, str) else (image, None)
    else:
        raise SchemaError(f"`{image_column}` is {type(image).__name__}, not an image")
    caption = _text(row.get(text_column), f"`{text_column}`")
    if IMAGE_TOKEN in caption:
        raise SchemaError(f"`{text_column}` spells {IMAGE_TOKEN}")
    if isinstance(data, (bytes, bytearray)) and data:
        return {"id": where, "type": "pair", "image": "image", "text": caption, "_image_bytes": {"image": bytes(data)}}
    if isinstance(path, str) and path:
        return {"id": where, "type": "pair", "image": path, "text": caption}
    raise SchemaError(f"`{image_column}` has neither bytes nor a path")


MISSING_IMAGES = ("skip", "drop")  # an OBELICS image the store lacks: skip the document, or leave the image out


def obelics_record(row: Mapping[str, Any], where: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """An OBELICS row -> an interleaved record, its images fetched from `options["image_store"]`."""
    images, texts = row.get("images"), row.get("texts")
    if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
        raise SchemaError("a row has `images` and `texts` lists of the same length")
    store, missing = options["image_store"], options.get("missing_images", "skip")
    content, embedded, paragraphs = [], {}, []
    for i, (url, text) in enumerate(zip(images, texts)):
        if (url is None) == (text is None):
            raise SchemaError(f"position {i} holds {'both an image and a text' if url is not None else 'neither an image nor a text'}")
        if text is not None:
            if not isinstance(text, str):
                raise SchemaError(f"texts[{i}] is {type(text).__name__}, not text")
            if IMAGE_TOKEN in text:
                raise SchemaError(f"texts[{i}] spells {IMAGE_TOKEN}")
            paragraphs.append(text)
            continue
        if not isinstance(url, str):
            raise SchemaError(f"images[{i}] is {type(url).__name__}, not a URL")
        try:
            data = store.get(url)
        except MissingImage as error:
            if missing == "skip":
                raise SchemaError(f"images[{i}] ({url}): {error}", "missing_image") from error
            continue
        if paragraphs:
            content.append({"type": "text", "text": "\n\n".join(paragraphs)})
            paragraphs = []
        embedded[f"image_{i}"] = data
        content.append({"type": "image", "image": f"image_{i}"})
    if paragraphs:
        content.append({"type": "text", "text": "\n\n".join(paragraphs)})
    if not any(part["type"] == "text" and part["text"].strip() for part in content):
        raise SchemaError("the document has no text")
    return {"id": where, "type": "interleaved", "content": content, "_image_bytes": embedded}


ADAPTERS: dict[str, Callable[[Mapping[str, Any], str, Mapping[str, Any]], dict[str, Any]]] = {
    "the_cauldron": cauldron_record,
    "docmatix": cauldron_record,
    "obelics": obelics_record,
    "pairs": pair_record,
}
SCHEMAS = ("records", *ADAPTERS, "pdfa")  # "records": rows that are our own records already


def pdfa_pages(ocr: bytes) -> list[str]:
    """The OCR text of each page of a PDFA sample's `.json` (its lines, one per line)."""
    try:
        pages = json.loads(ocr)["pages"]
        return ["\n".join(line for line in page["lines"]["text"] if isinstance(line, str)) for page in pages]
    except (ValueError, KeyError, TypeError) as error:
        raise SchemaError(f"the OCR json is not PDFA's ({type(error).__name__}: {error})") from error


_PDFIUM = threading.Lock()


def pdfa_record(sample: Mapping[str, Any], where: str, page: int, dpi: int) -> dict[str, Any]:
    """Page `page` of a PDFA sample (`{"pdf": bytes, "json": bytes}`) -> a document record, the page
    rendered to an RGB image at `dpi`."""
    import pypdfium2 as pdfium  # only PDFA sources render PDFs

    text = pdfa_pages(sample["json"])[page]
    if not text.strip():
        raise SchemaError(f"page {page} has no OCR text")
    with _PDFIUM:  # pdfium is not thread-safe: the pipeline's reader threads render one at a time
        document = None
        try:
            document = pdfium.PdfDocument(sample["pdf"])
            rendered = document[page]
            image = rendered.render(scale=dpi / 72).to_pil().convert("RGB")
            rendered.close()
        except (pdfium.PdfiumError, IndexError, ValueError) as error:
            raise SchemaError(f"page {page} of the PDF cannot be rendered ({error})") from error
        finally:
            if document is not None:
                document.close()  # here, not from the garbage collector in some other thread
    return {"id": where, "type": "document", "image": "page", "text": text, "_image_bytes": {"page": image}}


def detect_schema(names: Iterable[str]) -> str | None:
    """The schema a table's columns (or a WebDataset sample's extensions) spell, or None when they
    fit none."""
    names = set(names)
    if {"pdf", "json"} <= names:
        return "pdfa"
    if {"images", "texts"} <= names and names & {"metadata", "general_metadata"}:
        return "obelics"
    if {"images", "texts"} <= names:
        return "the_cauldron"  # Docmatix's columns are the same
    if "type" in names:
        return "records"
    if names & set(IMAGE_COLUMNS) and names & set(TEXT_COLUMNS):
        return "pairs"
    return None


def pair_columns(names: Iterable[str], image_column: str = "", text_column: str = "") -> dict[str, str]:
    """The image and caption columns of a `pairs` table: the given ones (checked), or the first of
    the usual names present."""
    names = list(names)
    chosen = {}
    for role, given, usual in (("image", image_column, IMAGE_COLUMNS), ("text", text_column, TEXT_COLUMNS)):
        name = given or next((n for n in usual if n in names), "")
        if name not in names:
            raise ValueError(f"No {role} column {given or 'among ' + str(list(usual))} in the columns {names} "
                             f"(SourceConfig.{role}_column)")
        chosen[role] = name
    return chosen


def to_record(schema: str, row: Mapping[str, Any], where: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One row as our record (see the module's doc); `SchemaError` when it does not fit. `options`:
    `pair_columns`' choice for `pairs`; `image_store` and `missing_images` for `obelics`."""
    if schema == "records":
        return dict(row)
    if schema not in ADAPTERS:
        raise ValueError(f"Unknown schema '{schema}'; choose one of {SCHEMAS}")
    return ADAPTERS[schema](row, where, options or {})
