"""Random model inputs for the parity, generation and kernel tests; odd images for the image processors;
image files for the data and server tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import IMAGE_TOKEN_ID


def make_batch(rng, rows, n_latents, vocab=IMAGE_TOKEN_ID):
    """rows: list of (text_lengths, image_sizes). Text segments and images alternate:
    text[0] img[0] text[1] img[1] ... text[-1]. Rows are left-padded to one length; images are
    zero-padded into [batch, max_images, max_h, max_w, 3] with a pixel mask."""
    ids, images = [], []
    for text_lengths, sizes in rows:
        assert len(text_lengths) == len(sizes) + 1
        row = []
        for i, n in enumerate(text_lengths):
            row.extend(rng.integers(3, vocab, size=n).tolist())
            if i < len(sizes):
                row.extend([IMAGE_TOKEN_ID] * n_latents)
        ids.append(row)
        images.append(sizes)
    seq = max(len(r) for r in ids)
    input_ids = np.zeros((len(rows), seq), np.int64)
    attention_mask = np.zeros((len(rows), seq), np.int64)
    for b, row in enumerate(ids):
        input_ids[b, seq - len(row):] = row
        attention_mask[b, seq - len(row):] = 1
    max_images = max(1, max(len(s) for s in images))
    all_sizes = [hw for s in images for hw in s] or [(8, 8)]
    max_h, max_w = max(h for h, _ in all_sizes), max(w for _, w in all_sizes)
    pixel_values = np.zeros((len(rows), max_images, max_h, max_w, 3), np.float32)
    pixel_mask = np.zeros((len(rows), max_images, max_h, max_w), bool)
    for b, sizes in enumerate(images):
        for i, (h, w) in enumerate(sizes):
            pixel_values[b, i, :h, :w] = rng.uniform(-1, 1, size=(h, w, 3))
            pixel_mask[b, i, :h, :w] = True
    return input_ids, attention_mask, pixel_values, pixel_mask


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width x height` RGB pixels and holds none (a decompression bomb's header:
    read without being decoded, it must be refused from its size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def make_images(rng) -> list[Image.Image]:
    """At least 20 images of varied sizes and modes, fresh each run."""
    def noise(h, w, c=3):
        return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    images = [
        Image.fromarray(noise(1, 1)),
        Image.fromarray(noise(5, 3000)),
        Image.fromarray(noise(4000, 30)),
        Image.fromarray(noise(378, 500)),
        Image.fromarray(noise(700, 378)),
        Image.fromarray(noise(980, 640)),
        Image.fromarray(noise(413, 980)),
        Image.fromarray(noise(980, 980)),
        Image.fromarray(noise(378, 378)),
        Image.fromarray(noise(1200, 1500)),
        Image.fromarray(noise(300, 200, 1)),
        Image.fromarray(noise(640, 480, 4)),
        Image.fromarray(noise(333, 777)).convert("P", palette=Image.ADAPTIVE, colors=64),
        Image.fromarray(noise(123, 456)).convert("CMYK"),
        Image.fromarray(rng.integers(0, 65536, size=(250, 310), dtype=np.uint16)),
        Image.fromarray(noise(90, 160, 1)).convert("LA"),
        Image.fromarray(noise(2, 1999)),
        Image.fromarray(noise(1001, 979)),
    ]
    transparent = Image.fromarray(noise(200, 150)).convert("P", palette=Image.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 3
    images.append(transparent)
    for _ in range(5):  # random sizes and aspect ratios
        h, w = (int(x) for x in rng.integers(1, 1600, size=2))
        images.append(Image.fromarray(noise(h, w)))
    return images
