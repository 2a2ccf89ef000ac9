"""Synthetic local data: rendered-text images with captions, pages, documents and Q/A turns.

    python -m idefics_jax.data.synthetic OUT_DIR [--num 2000] [--seed 0] [--formats jsonl,array_record,tfds]

Writes, for each kind of source, `OUT_DIR/<source>/data.jsonl` with its images, and the same
records as ArrayRecord (`OUT_DIR/array_record/<source>/`) and as a TFDS build
(`OUT_DIR/tfds/`):

    pairs          an image of rendered text + a caption naming the text, its colour and font
    documents      a page of several text lines (a PDF-like page) + its transcription
    interleaved    a short document: paragraphs with 2-3 images between them
    conversations  "What is written in the image?"-style questions with the exact answer
    conversations_eval   held-out questions in the same format, for exact-match evaluation
    tasks          questions of six tasks that tell design choices apart (reading small and large
                   print, counting, locating, two images, captions; data/synthetic_tasks.py), each
                   record naming its `task`
    tasks_eval     held-out questions of the same tasks, as many of each (twice conversations_eval's)

Images vary in words, numbers and short lines; font (the DejaVu, STIX and Computer Modern faces
that matplotlib ships), size, colours, background (plain, gradient, noise) and aspect ratio.
A few real photographs shipped with matplotlib appear in pairs and documents. Also writes
`OUT_DIR/tokenizer.model`, a sentencepiece model trained on the generated text (vocabulary 1,024
+ Idefics2's 3 added tokens, the `tiny` preset's 1,027), or with `--tokenizer json` a byte-level
BPE `OUT_DIR/tokenizer.json` as SmolVLM ships (1,024 tokens, SmolVLM's special tokens first:
`JSON_SPECIAL_TOKENS`, the `smolvlm-tiny` preset's ids) and its `tokenizer_config.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from idefics_jax.data import tfds_builder
from idefics_jax.data.image_tokens import ADDED_TOKENS, END_OF_UTTERANCE, GLOBAL_IMAGE, tile_tag
from idefics_jax.data.json_tokenizer import JsonTokenizer, train_json_tokenizer
from idefics_jax.data.synthetic_tasks import TASKS, task_sample
from idefics_jax.data.sources import write_array_record
from idefics_jax.data.tokenizer import train_tokenizer

WORDS = (
    "apple river stone cloud green orange music paper light window garden silver bridge morning "
    "ocean forest yellow purple winter summer coffee market planet rocket castle dragon pencil "
    "mirror candle island valley thunder bottle letter button camera circle engine flower guitar "
    "hammer jacket kettle ladder magnet needle pepper rabbit saddle tunnel violin wallet zebra"
).split()
COLOURS = {"black": (20, 20, 20), "white": (245, 245, 245), "red": (200, 30, 30), "green": (30, 150, 60),
           "blue": (30, 60, 200), "yellow": (235, 200, 40), "purple": (120, 50, 160), "orange": (240, 130, 30),
           "gray": (128, 128, 128), "brown": (120, 80, 40)}
QUESTIONS = ["What is written in the image?", "What does the text say?", "Read the text in the image.",
             "What is written here?", "Transcribe the text."]
# the synthetic tokenizer.json's special tokens, ids 0, 1, ... in this order (`<image>` is 3), and their roles
JSON_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", *ADDED_TOKENS, GLOBAL_IMAGE,
                       *(tile_tag(r, c) for r in range(1, 7) for c in range(1, 7)))
JSON_ROLES = {"bos_token": "<|im_start|>", "eos_token": END_OF_UTTERANCE, "pad_token": "<|im_end|>"}
TOKENIZER_KINDS = ("sentencepiece", "json")
EASY_WORDS = WORDS[:20]  # easy mode: 20 words and the digits 0-9, 30 possible answers
EASY_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
NUMBER_QUESTIONS = ["What number is shown?", "Which number is written in the image?"]


def font_files() -> list[str]:
    """TrueType faces that installed packages ship (matplotlib), else the system's DejaVu."""
    found = []
    try:
        import matplotlib  # optional here: only where its fonts are

        ttf = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
        for pattern in ("DejaVuSans*.ttf", "DejaVuSerif*.ttf", "STIXGeneral*.ttf", "cmr10.ttf", "cmtt10.ttf", "cmss10.ttf"):
            found += sorted(glob.glob(os.path.join(ttf, pattern)))
    except ImportError:
        pass
    found = [f for f in found if "Display" not in f]
    return found or sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))


def photo_files() -> list[str]:
    """Real photographs shipped by an installed package (matplotlib's sample data)."""
    try:
        import matplotlib  # optional here: only where its sample photograph is

        data = os.path.join(matplotlib.get_data_path(), "sample_data")
        return [p for p in (os.path.join(data, "grace_hopper.jpg"),) if os.path.exists(p)]
    except ImportError:
        return []


class Renderer:
    """easy=True: one of 20 words or a digit (30 possible answers), large black type on a white (plain or tinted
    gradient) canvas, four upright DejaVu faces: what a tiny vision tower trained from scratch can
    learn to read on a CPU in minutes. (Measured with a classifier on the tiny tower alone, 20
    classes, 1,500 steps of 32 images: 14% held-out accuracy with the full colour and font
    variety, 55% with these four faces in black on white.)"""

    def __init__(self, seed: int, easy: bool = False):
        self.easy = easy
        self.rng = np.random.default_rng(seed)
        self.fonts = font_files()
        if easy:
            self.fonts = [f for f in self.fonts if Path(f).name in EASY_FONTS] or self.fonts
        self.photos = photo_files()

    def choice(self, items):
        return items[int(self.rng.integers(len(items)))]

    def text(self) -> tuple[str, str]:
        """(text, kind): a word, a number or a short line."""
        kind = self.choice(["word", "number"] if self.easy else ["word", "number", "line"])
        if kind == "word":
            return self.choice(EASY_WORDS if self.easy else WORDS), kind
        if kind == "number":
            digits = 1 if self.easy else int(self.rng.integers(1, 7))
            return str(int(self.rng.integers(0, 10 ** digits))), kind
        return " ".join(self.choice(WORDS) for _ in range(int(self.rng.integers(2, 5)))), kind

    def font(self, size: int):
        if self.fonts:
            path = self.choice(self.fonts)
            return ImageFont.truetype(path, size), Path(path).stem
        return ImageFont.load_default(size=size), "default"

    def background(self, width: int, height: int, base, noise: bool = True) -> Image.Image:
        style = self.choice(["plain", "gradient", "noise"] if noise and not self.easy else ["plain", "gradient"])
        base = np.asarray(base, np.float32)
        if style == "plain":
            array = np.broadcast_to(base, (height, width, 3))
        elif style == "gradient":
            other = self.rng.uniform(0, 255, 3)
            t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
            array = np.broadcast_to(base * (1 - 0.5 * t) + other * 0.5 * t, (height, width, 3))
        else:
            array = base + self.rng.normal(0, 18, (height, width, 3))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))

    def colours(self):
        if self.easy:
            return "black", "white"
        names = list(COLOURS)
        bg = self.choice(names)
        fg = self.choice([n for n in names if np.abs(np.subtract(COLOURS[n], COLOURS[bg])).sum() > 250])
        return fg, bg

    def text_image(self, text: str) -> tuple[Image.Image, dict]:
        fg, bg = self.colours()
        size = int(self.rng.integers(28, 44) if self.easy else self.rng.integers(14, 48))
        font, font_name = self.font(size)
        box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
        text_w, text_h = box[2] - box[0], box[3] - box[1]
        margin = (4, 12) if self.easy else (6, 60)
        margin_w, margin_h = int(self.rng.integers(*margin)), int(self.rng.integers(*margin))
        width, height = text_w + 2 * margin_w, text_h + 2 * margin_h
        if not self.easy and self.rng.random() < 0.3:  # a tall or square canvas now and then
            height = max(height, int(width * self.rng.uniform(0.5, 1.5)))
        image = self.background(width, height, COLOURS[bg])
        x = int(self.rng.integers(0, max(1, width - text_w))) - box[0]
        y = int(self.rng.integers(0, max(1, height - text_h))) - box[1]
        ImageDraw.Draw(image).text((x, y), text, fill=COLOURS[fg], font=font)
        return image, {"colour": fg, "background": bg, "font": font_name}

    def page(self) -> tuple[Image.Image, str]:
        lines = [" ".join(self.choice(WORDS) for _ in range(int(self.rng.integers(3, 8))))
                 for _ in range(int(self.rng.integers(3, 9)))]
        size = int(self.rng.integers(14, 24))
        font, _ = self.font(size)
        width = int(self.rng.integers(320, 640))
        height = int(width * self.rng.uniform(1.2, 1.5))
        image = self.background(width, height, (250, 250, 245), noise=False)
        draw = ImageDraw.Draw(image)
        for i, line in enumerate(lines):
            draw.text((20, 20 + i * int(size * 1.6)), line, fill=(15, 15, 15), font=font)
        return image, "\n".join(lines)


def _save(image: Image.Image, directory: Path, name: str, rng) -> str:
    # PNG mostly, JPEG sometimes, and always for busy (noisy) images, which PNG stores badly
    gray = np.asarray(image.convert("L"), np.float32)
    busy = np.abs(np.diff(gray, axis=1)).mean() > 6
    fmt = "jpg" if busy or rng.random() < 0.3 else "png"
    rel = f"images/{name}.{fmt}"
    image.convert("RGB").save(directory / rel, quality=92) if fmt == "jpg" else image.save(directory / rel)
    return rel


def generate(out_dir: str | os.PathLike, num: int = 2000, seed: int = 0, num_eval: int | None = None,
             formats: tuple[str, ...] = ("jsonl", "array_record", "tfds"), vocab_size: int = 1024,
             easy: bool = False, tokenizer: str = "sentencepiece") -> dict[str, int]:
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer {tokenizer!r} is not one of {TOKENIZER_KINDS}")
    out = Path(out_dir)
    renderer = Renderer(seed, easy=easy)
    rng = renderer.rng
    counts = {}
    texts_for_tokenizer = []
    sources = ["pairs", "documents", "interleaved", "conversations", "conversations_eval", "tasks", "tasks_eval"]
    for source in sources:
        (out / source / "images").mkdir(parents=True, exist_ok=True)
        n = (num_eval if num_eval is not None else max(10, num // 10)) if source.endswith("eval") else num
        n = 2 * n if source == "tasks_eval" else n  # scored per task: twice the questions
        records = []
        for i in range(n):
            name = f"{source}-{i:06d}"
            if source == "pairs":
                if renderer.photos and rng.random() < 0.03:
                    image = Image.open(renderer.choice(renderer.photos))
                    text = "a black and white photograph of a woman in uniform"
                else:
                    written, _ = renderer.text()
                    image, style = renderer.text_image(written)
                    text = f'the {"word" if " " not in written else "text"} "{written}" written in {style["colour"]} on {style["background"]}'
                records.append({"id": name, "type": "pair", "image": _save(image, out / source, name, rng), "text": text})
            elif source == "documents":
                image, text = renderer.page()
                records.append({"id": name, "type": "document", "image": _save(image, out / source, name, rng),
                                "text": text})
            elif source == "interleaved":
                content = []
                for j in range(int(rng.integers(2, 4))):
                    written, _ = renderer.text()
                    image, style = renderer.text_image(written)
                    content.append({"type": "text", "text": f"Figure {j + 1} shows {style['colour']} text. "})
                    content.append({"type": "image", "image": _save(image, out / source, f"{name}-{j}", rng)})
                    content.append({"type": "text", "text": f" It reads: {written}. "})
                records.append({"id": name, "type": "interleaved", "content": content})
            elif source.startswith("tasks"):
                task = TASKS[i % len(TASKS)]
                images, question, answer = task_sample(renderer, task)
                paths = [_save(image, out / source, f"{name}-{j}", rng) for j, image in enumerate(images)]
                records.append({"id": name, "type": "conversation", "task": task, "images": paths,
                                "messages": [{"role": "user", "content": "<image>" * len(paths) + question},
                                             {"role": "assistant", "content": answer}]})
            else:
                written, kind = renderer.text()
                image, _ = renderer.text_image(written)
                question = renderer.choice(NUMBER_QUESTIONS if kind == "number" else QUESTIONS)
                records.append({"id": name, "type": "conversation", "images": [_save(image, out / source, name, rng)],
                                "messages": [{"role": "user", "content": f"<image>{question}"},
                                             {"role": "assistant", "content": written}]})
            texts_for_tokenizer.append(json.dumps(records[-1]))
        with open(out / source / "data.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        counts[source] = len(records)
        if "array_record" in formats:
            write_array_record(out / "array_record" / source, records, out / source, num_shards=2)
    if "tfds" in formats:
        for source in sources:
            tfds_builder.build(out / source, out / "tfds" / source)
    if tokenizer == "json":
        json_text = train_json_tokenizer(texts_for_tokenizer + WORDS, vocab_size, JSON_SPECIAL_TOKENS)
        files = JsonTokenizer(json_text=json_text, **JSON_ROLES).files()
    else:
        files = {"tokenizer.model": train_tokenizer(texts_for_tokenizer + WORDS, vocab_size, seed)}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m idefics_jax.data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, default=2000, help="records per training source")
    parser.add_argument("--num-eval", type=int, default=None, help="held-out conversations (default num / 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default="jsonl,array_record,tfds")
    parser.add_argument("--easy", action="store_true", help="single words / 2-digit numbers in large type")
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="sentencepiece",
                        help="tokenizer.model (Idefics2's kind) or tokenizer.json (SmolVLM's)")
    args = parser.parse_args(argv)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    counts = generate(args.out_dir, args.num, args.seed, args.num_eval, formats, easy=args.easy,
                      tokenizer=args.tokenizer)
    print(f"Wrote {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; formats {formats}")


if __name__ == "__main__":
    main()
