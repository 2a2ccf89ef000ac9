"""Synthetic tasks that can tell the paper's design choices apart: one question per image (or pair of
images), each record named by its `task`:

    reading_small   a word or digit in small print on a wide canvas: resolution, image splitting and
                    visual tokens should matter
    reading_large   the same in large print on a small canvas
    counting        "How many circles are there?": 1 to 5 circles
    locating        "Where is the square?": top left, top right, bottom left or bottom right
    two_images      "What is written in the first / second image?": two images, one question
    caption         "Describe the image.": "a red circle", "a blue triangle", ...

`generate(...)` (idefics_jax.data.synthetic) writes them as the `tasks` training source and the
held-out `tasks_eval`, in the conversation format (`images`, `messages`, plus `task`), so that
`evaluate` scores each task apart. The drawing is deliberately plain (black on white, four
upright faces: `Renderer(easy=True)`), what a tiny model trained from scratch can learn on a CPU.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

TASKS = ("reading_small", "reading_large", "counting", "locating", "two_images", "caption")
SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = {"red": (200, 30, 30), "green": (30, 150, 60), "blue": (30, 60, 200), "black": (20, 20, 20)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
WHITE = (245, 245, 245)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[int, int], radius: int, fill):
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)


def word_image(renderer, text: str, size: int, canvas: tuple[int, int] | None = None) -> Image.Image:
    """`text` in black type of `size` px on white; on a `canvas` (width, height) at a random place."""
    font, _ = renderer.font(size)
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    text_w, text_h = box[2] - box[0], box[3] - box[1]
    rng = renderer.rng
    width, height = canvas or (text_w + 2 * int(rng.integers(4, 12)), text_h + 2 * int(rng.integers(4, 12)))
    width, height = max(width, text_w + 2), max(height, text_h + 2)
    image = Image.new("RGB", (width, height), WHITE)
    x = int(rng.integers(0, width - text_w)) - box[0]
    y = int(rng.integers(0, height - text_h)) - box[1]
    ImageDraw.Draw(image).text((x, y), text, fill=(20, 20, 20), font=font)
    return image


def counting_image(rng, count: int, side: int = 112) -> Image.Image:
    """`count` black circles that do not touch, on a `side` px square."""
    image = Image.new("RGB", (side, side), WHITE)
    draw, placed = ImageDraw.Draw(image), []
    while len(placed) < count:
        r = int(rng.integers(6, 11))
        x, y = (int(v) for v in rng.integers(r + 2, side - r - 2, 2))
        if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 4) ** 2 for a, b, c in placed):
            placed.append((x, y, r))
            draw_shape(draw, "circle", (x, y), r, SHAPE_COLOURS["black"])
    return image


def locating_image(rng, quadrant: str) -> Image.Image:
    """A black square in one quadrant of a canvas of random aspect ratio."""
    width, height = int(rng.integers(80, 160)), int(rng.integers(80, 160))
    image = Image.new("RGB", (width, height), WHITE)
    r = int(rng.integers(7, 13))
    right, bottom = quadrant.endswith("right"), quadrant.startswith("bottom")
    x = int(rng.integers(width // 2 + r + 2, width - r - 2)) if right else int(rng.integers(r + 2, width // 2 - r - 2))
    y = int(rng.integers(height // 2 + r + 2, height - r - 2)) if bottom else int(rng.integers(r + 2, height // 2 - r - 2))
    draw_shape(ImageDraw.Draw(image), "square", (x, y), r, SHAPE_COLOURS["black"])
    return image


def caption_image(rng, shape: str, colour: str) -> Image.Image:
    side = int(rng.integers(56, 113))
    image = Image.new("RGB", (side, side), WHITE)
    r = int(rng.integers(side // 6, side // 3))
    centre = tuple(int(v) for v in rng.integers(r + 2, side - r - 2, 2))
    draw_shape(ImageDraw.Draw(image), shape, centre, r, SHAPE_COLOURS[colour])
    return image


def task_sample(renderer, task: str) -> tuple[list[Image.Image], str, str]:
    """(images, question, answer) of one sample of `task`."""
    rng = renderer.rng
    if task in ("reading_small", "reading_large"):
        text, _ = renderer.text()
        if task == "reading_small":  # ~2x the longest edge of a tiny run: read at half size unless split
            image = word_image(renderer, text, int(rng.integers(14, 19)), (int(rng.integers(200, 240)), 100))
        else:
            image = word_image(renderer, text, int(rng.integers(30, 44)))
        return [image], "What is written in the image?", text
    if task == "counting":
        count = int(rng.integers(1, 6))
        return [counting_image(rng, count)], "How many circles are there?", str(count)
    if task == "locating":
        quadrant = renderer.choice(QUADRANTS)
        return [locating_image(rng, quadrant)], "Where is the square?", quadrant
    if task == "two_images":
        texts = [renderer.text()[0] for _ in range(2)]
        which = int(rng.integers(2))
        images = [word_image(renderer, t, int(rng.integers(30, 44))) for t in texts]
        return images, f"What is written in the {('first', 'second')[which]} image?", texts[which]
    if task == "caption":
        shape, colour = renderer.choice(SHAPES), renderer.choice(list(SHAPE_COLOURS))
        return [caption_image(rng, shape, colour)], "Describe the image.", f"a {colour} {shape}"
    raise ValueError(f"Unknown task {task!r}; tasks are {TASKS}")
