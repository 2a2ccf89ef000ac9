"""Conversations in, answers out: the processor, the model and cached generation together.

    assistant = Assistant(load("ckpt_dir"))            # idefics_jax.checkpoints.load
    print(assistant.reply([{"role": "user", "content": "<image>What is written here?"}], ["photo.png"]))
    for piece in assistant.stream_reply(messages, images, split=True):   # 320 visual tokens per image
        print(piece, end="", flush=True)

The visual-token budget is a choice per call: for Idefics2 `split=False` gives each image 64
tokens (the whole image), `split=True` 320 (4 crops + the whole image, 64 each); for Idefics3 and
SmolVLM `split=False` one tile, `split=True` a grid of tiles + the whole image; `split=None` (the
default) as the checkpoint's image-processing settings say. Prompt lengths and image sizes are
rounded up (left padding, zero pixels) so that a stream of requests compiles a bounded number of
programs.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from idefics_jax.data.image_processing import ImageLike
from idefics_jax.data.image_tokens import END_OF_UTTERANCE, IMAGE_TOKEN, count_placeholders
from idefics_jax.checkpoints import LoadedModel
from idefics_jax.data.processor import Processor
from idefics_jax.inference.conversation import Conversation, round_up
from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import GREEDY, Sampling
from idefics_jax.models.idefics2 import Idefics2


class Assistant:
    def __init__(self, loaded: LoadedModel, *, dtype=jnp.float32, attention_impl: str = "auto",
                 prompt_multiple: int = 32, image_multiple: int | None = None, mesh=None):
        """mesh: generate on a `(data, fsdp, tensor)` device mesh (`Generator`); one device by default."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = Idefics2(loaded.config, attention_impl=attention_impl, dtype=dtype)
        stops = [self.tokenizer.token_id(END_OF_UTTERANCE), self.tokenizer.eos_id]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None and i >= 0))
        self.generator = Generator(self.model, loaded.params, stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id,
                                   mesh=mesh)
        self.prompt_multiple = prompt_multiple
        self.image_multiple = image_multiple or loaded.config.vision.patch_size * 8

    def processor(self, split: bool | None = None) -> Processor:
        return self.loaded.processor(split)

    def prepare(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[ImageLike]], *,
                split: bool | None = None, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Chat conversations (each ending with a user turn) -> a padded model batch.

        `batch_size` pads the batch by repeating its last conversation (fixed shapes for evaluation)."""
        processor = self.processor(split)
        prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        images = [list(row) for row in images]
        if batch_size:
            prompts += [prompts[-1]] * (batch_size - len(prompts))
            images += [images[-1]] * (batch_size - len(images))
        batch = processor(prompts, images)
        pad = round_up(batch["input_ids"].shape[1], self.prompt_multiple) - batch["input_ids"].shape[1]
        batch["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (pad, 0)), constant_values=self.tokenizer.pad_id)
        batch["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (pad, 0)))
        if "pixel_values" in batch:
            h, w = batch["pixel_values"].shape[2:4]
            grow = ((0, 0), (0, 0), (0, round_up(h, self.image_multiple) - h), (0, round_up(w, self.image_multiple) - w))
            batch["pixel_values"] = np.pad(batch["pixel_values"], grow + ((0, 0),))
            batch["pixel_attention_mask"] = np.pad(batch["pixel_attention_mask"], grow)
        return batch

    def _inputs(self, batch):
        return (batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                batch.get("pixel_attention_mask"))

    def decode(self, tokens: Sequence[int]) -> str:
        """New tokens -> text, up to the first stop token."""
        kept = []
        for token in tokens:
            if token in self.stop_ids:
                break
            kept.append(int(token))
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    def generate_batch(self, conversations, images, *, split: bool | None = None, max_new_tokens: int = 64,
                       sampling: Sampling = GREEDY, seed: int = 0, batch_size: int | None = None) -> list[str]:
        batch = self.prepare(conversations, images, split=split, batch_size=batch_size)
        new = self.generator.generate(*self._inputs(batch), max_new_tokens=max_new_tokens, sampling=sampling,
                                      seed=seed)
        return [self.decode(row) for row in new[:len(conversations)]]

    def reply(self, messages: Sequence[dict], images: Sequence[ImageLike] = (), **kwargs) -> str:
        return self.generate_batch([messages], [images], **kwargs)[0]

    def stream_reply(self, messages: Sequence[dict], images: Sequence[ImageLike] = (), *, split: bool | None = None,
                     max_new_tokens: int = 256, sampling: Sampling = GREEDY, seed: int = 0) -> Iterator[str]:
        """Yields the answer's text piece by piece as tokens are chosen (see `text_pieces`)."""
        batch = self.prepare([messages], [images], split=split)
        steps = self.generator.stream(*self._inputs(batch), max_new_tokens=max_new_tokens, sampling=sampling,
                                      seed=seed)
        yield from self.text_pieces(int(step[0]) for step in steps)

    def text_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """New tokens -> the answer's text piece by piece, up to the first stop token; the pieces join
        into `decode(tokens)`. Text that ends in an unfinished UTF-8 sequence (byte-fallback tokens)
        waits for the bytes that complete it; trailing whitespace waits for the text after it (the
        answer is stripped)."""
        pieces = TextPieces(self)
        for token in tokens:
            if token in self.stop_ids:
                break
            if piece := pieces.add(token):
                yield piece
        if piece := pieces.end():
            yield piece

    def chat(self, **options) -> "Chat":
        """A conversation that keeps its KV cache between turns; options as `Chat`'s."""
        return Chat(self, **options)


class TextPieces:
    """`Assistant.text_pieces` fed one token at a time (a server pushing each row's tokens):
    `add(token)` returns the text it completes ("" while it waits), `end()` what is left; the
    caller stops adding at a stop token."""

    def __init__(self, assistant: Assistant):
        self.assistant, self.kept, self.shown = assistant, [], ""

    def add(self, token: int) -> str:
        self.kept.append(int(token))
        text = self.assistant.tokenizer.decode(self.kept, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(self.shown) or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def end(self) -> str:
        final = self.assistant.decode(self.kept)
        return final[len(self.shown):] if final.startswith(self.shown) else ""


def system_message(text: str | None) -> list[dict]:
    """[the system message] to open a conversation with, or [] without one."""
    if text is None:
        return []
    if not text.strip() or IMAGE_TOKEN in text:
        raise ValueError(f"A system message is text without {IMAGE_TOKEN} placeholders, got {text!r}")
    return [{"role": "system", "content": text}]


class Chat:
    """A conversation with an `Assistant` whose turns each prefill only what is new (`Conversation`):
    the images of earlier turns are processed and encoded once, the earlier turns' text is not run again.

        chat = assistant.chat(max_new_tokens=128)
        for piece in chat.stream({"role": "user", "content": "<image>What is this?"}, ["photo.png"]):
            print(piece, end="")
        answer = "".join(chat.stream({"role": "user", "content": "And its colour?"}))

    The answers equal `Assistant.reply` on the whole conversation, system message first (answer n,
    retries counted, with `seed + n`). A turn is kept (in `messages`) once its answer has been
    streamed, also in part when the caller stops early; `retry()` answers the last turn again in
    place. When a turn and its answer would not fit the model's context, the oldest turns are
    dropped, with their images, down to 3/4 of it (`drop_oldest`; `dropped` counts the messages):
    the conversation goes on, that turn prefills what is left of it after the system message, and
    the next turns reuse the cache again. An answer is kept with any special token it spells
    (`<image>`, `</s>`, ...) broken by an invisible word joiner (`Tokenizer.disarm`), so that the
    next prompt reads it as text: a spelled `<image>` would otherwise be a placeholder without an image.

    `system`: a system message (text, no images) that opens every prompt (Idefics2's template
    writes it as a "System:" turn); it is never dropped, `reset()` keeps it, and its tokens stay in
    the cache across a drop. `messages` holds the turns after it.
    """

    def __init__(self, assistant: Assistant, *, split: bool | None = None, max_new_tokens: int = 256,
                 sampling: Sampling = GREEDY, seed: int = 0, drop_oldest: bool = True, system: str | None = None):
        self.system = system_message(system)
        self.assistant = assistant
        self.processor = assistant.processor(split)
        self.options = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        self.drop_oldest = drop_oldest
        config = assistant.loaded.config
        self.conversation = Conversation(assistant.generator, image_token_id=config.image_token_id,
                                         image_seq_len=config.image_seq_len, prompt_multiple=assistant.prompt_multiple,
                                         image_multiple=assistant.image_multiple)
        self.reset()

    def reset(self):
        """Starts a new conversation."""
        self.messages: list[dict] = []
        self.images: list[tuple[list, Any]] = []  # per image, its processed arrays (1, or 5 with splitting) and grid
        self.answers = 0  # answers given (retries too); answer n samples with seed + n
        self.dropped = 0  # messages dropped from the front so far, to fit the context
        self.conversation.reset()

    def stream(self, message: dict, images: Sequence[ImageLike] = ()) -> Iterator[str]:
        """A user message and its images (one per `<image>` in it) -> the answer's text, piece by piece."""
        if message.get("role") != "user":
            raise ValueError(f"A chat turn is a user message, got role {message.get('role')!r}")
        given = len(self.images)
        placeholders = count_placeholders(self.processor.apply_chat_template(self.messages + [message]))
        if placeholders != given + len(images):
            raise ValueError(f"The message has {placeholders - given} {IMAGE_TOKEN} placeholder(s) but "
                             f"{len(images)} image(s) were given")
        processed = [self.processor.read_image(image) for image in images]  # bad images raise here
        yield from self._turn(self.messages, self.images, message, processed)

    def retry(self) -> Iterator[str]:
        """The last answer again, in place of the old one: a new draw when sampling (each answer
        draws with the next seed), the same answer when greedy. Only the last user turn's end runs
        again: the cache still holds the conversation before the old answer."""
        if not self.messages:
            raise ValueError("There is no answer to retry yet")
        message = self.messages[-2]
        own = len(self.images) - count_placeholders(self.processor.render_turn(message))  # the images before that turn
        yield from self._turn(self.messages[:-2], self.images[:own], message, self.images[own:])

    def _turn(self, history: list[dict], history_images: list, message: dict, processed: list) -> Iterator[str]:
        """Answers `message` (its images processed) after `history`; the turn is kept at the end."""
        messages, kept_images, ids = self._fitted(history + [message], history_images + processed)
        arrays = [array for image, _ in kept_images for array in image]
        seed = self.options["seed"] + self.answers  # every answer its own draw, reproducibly
        tokens = self.conversation.stream(ids, arrays, **{**self.options, "seed": seed})
        pieces, answer = self.assistant.text_pieces(tokens), []
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        except GeneratorExit:  # the caller stopped early: keep the turn as far as it went
            self._keep(history, messages, answer, kept_images)
            raise
        finally:
            pieces.close()
            tokens.close()  # the conversation records its cache now
        self._keep(history, messages, answer, kept_images)

    def _fitted(self, messages: list[dict], images: list) -> tuple[list[dict], list, list[int]]:
        """(messages, their images, the prompt's token ids). When the prompt and the answer's
        `max_new_tokens` do not fit the context, the oldest messages are dropped until the prompt
        takes at most 3/4 of what is left (the new turn always stays): the turns after that reuse
        the cache again, where dropping just enough would prefill the whole conversation every turn."""
        budget = self.assistant.loaded.config.text.max_position_embeddings - self.options["max_new_tokens"]
        limit = budget
        while True:
            prompt = self.processor.apply_chat_template(self.system + messages, add_generation_prompt=True)
            ids = self.processor.encode_prompt(prompt, [grid for _, grid in images])
            if len(ids) <= limit or len(messages) == 1 or not self.drop_oldest:
                return messages, images, ids
            limit = budget * 3 // 4
            # the oldest message goes, and the messages after it up to the next user turn
            first = True
            while len(messages) > 1 and (first or messages[0]["role"] != "user"):
                images = images[count_placeholders(self.processor.render_turn(messages[0])):]
                messages, first = messages[1:], False

    def _keep(self, history, messages, answer, images):
        self.dropped += len(history) + 1 - len(messages)
        # kept as text that encodes to ordinary pieces: an answer that spells `<image>` must not
        # become a placeholder without an image in the next turn's prompt
        content = self.processor.tokenizer.disarm("".join(answer))
        self.messages = messages + [{"role": "assistant", "content": content}]
        self.images = images
        self.answers += 1
