"""Scoring answers on local question/answer data: exact match and VQA accuracy.

A record is a conversation in the data format of `idefics_jax.data` (`images`, relative to the
jsonl's directory or embedded in ArrayRecord / TFDS entries, and `messages`, the last of which is
the assistant's reference answer), read from any of that package's formats (`QuestionSet`).
An optional `answers` list holds several human answers, as VQAv2 has; without it the reference
answer counts as the only one.

- exact match: the generated answer equals the reference answer after stripping white space;
- VQA accuracy (VQAv2's metric): answers are normalised as VQAv2's evaluation does (lower case,
  punctuation, articles, number words) and an answer scores min(1, matches / 3) against the human
  answers, averaged over the leave-one-out subsets when there are several.
- ANLS (DocVQA's metric, Biten et al. 2019): 1 minus the normalised Levenshtein distance to the
  closest reference answer (lower case, white space collapsed), 0 when that distance is 0.5 or more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from idefics_jax.checkpoints import LoadedModel
from idefics_jax.checkpoints.processor import training_image_processor
from idefics_jax.data.image_processing import load_image
from idefics_jax.data.image_tokens import IMAGE_TOKEN, count_placeholders
from idefics_jax.data.sources import open_source
from idefics_jax.inference.assistant import Assistant
from idefics_jax.inference.engine import check_context
from idefics_jax.paths import as_path, is_url

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"  # VQAv2's list: not the period (below), the apostrophe or the colon
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
log = logging.getLogger(__name__)


def _strip_punctuation(text: str) -> str:
    """VQAv2's rule: a punctuation mark next to a space (or any, in a text with a number like
    1,000) is removed, one inside a word becomes a space ("x-ray" -> "x ray"); then periods."""
    given, remove = text, _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCTUATION:
        gone = remove or mark + " " in given or " " + mark in given
        text = text.replace(mark, "" if gone else " ")
    return _PERIOD.sub("", text)


def normalize_answer(text: str) -> str:
    """VQAv2's answer normalisation: white space, punctuation, lower case, number words to digits,
    no articles. Its table of contractions ("dont" -> "don't") is replaced by dropping apostrophes,
    which makes the same pairs equal."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(word, word) for word in text.lower().split() if word not in _ARTICLES]
    return " ".join(word for word in (w.replace("'", "") for w in words) if word)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    prediction = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in answers]
    if len(answers) == 1:
        return float(prediction == answers[0])
    scores = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return float(np.mean(scores))


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one prediction: the best over the answers."""
    clean = lambda text: " ".join(text.strip().lower().split())
    prediction, best = clean(prediction), 0.0
    for answer in map(clean, answers):
        distance = levenshtein(prediction, answer) / max(len(prediction), len(answer), 1)
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


class QuestionSet(Sequence):
    """Question/answer records, read as they are needed, from any format of `idefics_jax.data`: a
    jsonl file or a directory holding `data.jsonl` (images as files beside it), a directory of
    `.array_record` files (images embedded) or a TFDS build. `limit`: the first N records only."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path = as_path(path, "Question data")  # local, or gs://bucket/...
        self.format = data_format(self.path)
        self.source = open_source(self.path, self.format)
        self.base_dir = epath.Path(self.source.base_dir)
        self.size = len(self.source) if not limit else min(limit, len(self.source))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(f"record {index} of {self.size}")
        return self.source[index % self.size]

    def fingerprint(self) -> str:
        """Changes when the data's files do (names, sizes, modification times) or the limit does."""
        digest = hashlib.sha256(f"{self.format}:{self.size}".encode())
        for file in _files(self.path):
            if is_url(file):
                stat = file.stat()
                size, mtime = stat.length, stat.mtime
            else:
                stat = os.stat(file)
                size, mtime = stat.st_size, stat.st_mtime_ns
            digest.update(f"{file.name}:{size}:{mtime};".encode())
        return digest.hexdigest()[:16]


def _files(path: epath.Path) -> list[epath.Path]:
    """The files at or under `path`, in order (epath has no `rglob` for gs://)."""
    return [path] if path.is_file() else sorted(f for child in path.iterdir() for f in _files(child))


def data_format(path: epath.Path) -> str:
    """'jsonl', 'array_record' or 'tfds', from what `path` holds; a clear error when it holds none."""
    if path.is_file() and path.suffix == ".array_record" or path.is_dir() and any(path.glob("*.array_record")):
        return "array_record"
    if path.is_dir() and ((path / "dataset_info.json").exists() or any(path.glob("*/*/dataset_info.json"))):
        return "tfds"
    if path.is_file() or (path / "data.jsonl").exists():
        return "jsonl"
    raise FileNotFoundError(f"No question/answer data at {path}: expected a .jsonl file, or a directory with "
                            f"data.jsonl, .array_record files or a TFDS build")


def load_records(path: str | os.PathLike, limit: int | None = None) -> tuple[QuestionSet, epath.Path]:
    """(the records, the directory their image paths are relative to); see `QuestionSet`."""
    questions = QuestionSet(path, limit)
    return questions, questions.base_dir


def _inputs(record: dict, base_dir: epath.Path, processor, config, max_new_tokens: int) -> tuple[list[dict], list]:
    """A record's question turns and its images, checked: an unreadable image, a placeholder count
    that differs from the images, or a prompt too long for the context raises (ImageError,
    FileNotFoundError or ValueError)."""
    if record.get("type") == "_invalid":  # a jsonl line that is not a JSON object
        raise ValueError(record.get("_error", "invalid record"))
    messages = record.get("messages")
    if not messages or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise ValueError("a record needs `messages` ending with the assistant's answer (a string)")
    conversation = messages[:-1]
    embedded = record.get("_image_bytes") or {}  # ArrayRecord and TFDS records carry their images
    images = [load_image(embedded[ref] if ref in embedded else base_dir / ref) for ref in record.get("images", [])]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    placeholders = count_placeholders(prompt)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
    check_context(config, len(processor.encode_prompt(prompt, processor.grids(images))), max_new_tokens, "question")
    return conversation, images


def score(record: dict, prediction: str) -> dict:
    answer = record["messages"][-1]["content"]
    answers = record.get("answers") or [answer]
    return {"id": record.get("id"), "answer": answer, "prediction": prediction,
            "exact_match": prediction == answer.strip(), "vqa_accuracy": vqa_accuracy(prediction, answers),
            "anls": anls(prediction, answers), **({"task": record["task"]} if "task" in record else {})}


def summarize(results: Sequence[dict]) -> dict:
    """The report: mean scores over the records that were answered, how many could not be, and every
    result; records that name their `task` are also scored per task (`tasks`: {task: scores})."""
    def scores(rows):
        mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else 0.0
        return {"n": len(rows), "exact_match": mean("exact_match"), "vqa_accuracy": mean("vqa_accuracy"),
                "anls": mean("anls")}
    scored = [r for r in results if "error" not in r]
    tasks = sorted({r["task"] for r in scored if "task" in r})
    return {**scores(scored), "failed": len(results) - len(scored),
            **({"tasks": {t: scores([r for r in scored if r.get("task") == t]) for t in tasks}} if tasks else {}),
            "results": list(results)}


def evaluate_records(assistant, records: Sequence[dict], base_dir: str | os.PathLike, *, batch_size: int = 16,
                     max_new_tokens: int = 16, split: bool | None = None, progress: bool = False,
                     on_batch: Callable[[list[dict]], None] | None = None) -> dict:
    """Greedy answers for every record, scored; returns the report (`summarize`).

    A record whose images cannot be read, whose `<image>` count differs from its images, whose
    question does not fit the context with `max_new_tokens`, or that is malformed is not scored:
    its result holds the `error` (the report counts it in `failed`), and the others go on. A batch
    that runs out of device memory is answered in halves (down to single questions; one that does
    not fit alone is not scored); other errors of the model or device are raised.
    `on_batch(results)` is called with each batch's results as they come (to save progress)."""
    base_dir, processor, config = epath.Path(base_dir), assistant.processor(split), assistant.loaded.config
    results = []
    bar = tqdm(total=len(records), desc="evaluate", unit="question", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(records), batch_size):
        chunk, inputs, failed, predictions = records[start:start + batch_size], {}, {}, {}
        for i, record in enumerate(chunk):
            name = record.get("id") if isinstance(record, dict) else None
            try:
                inputs[i] = _inputs(record, base_dir, processor, config, max_new_tokens)
            except (ValueError, FileNotFoundError) as error:  # ImageError is a ValueError
                failed[i] = {"id": name, "error": str(error)}
            except (KeyError, TypeError, AttributeError) as error:  # not the data format's structure
                failed[i] = {"id": name, "error": f"malformed record ({type(error).__name__}: {error})"}
        if inputs:
            predictions = _answers(assistant, list(inputs.items()), batch_size, split=split,
                                   max_new_tokens=max_new_tokens)
        failed.update({i: {"id": chunk[i].get("id"), "error": p.error} for i, p in predictions.items()
                       if isinstance(p, _NoMemory)})
        batch = [failed[i] if i in failed else score(record, predictions[i]) for i, record in enumerate(chunk)]
        results += batch
        if on_batch is not None:
            on_batch(batch)
        bar.update(len(chunk))
    bar.close()
    return summarize(results)


class _NoMemory(NamedTuple):
    error: str


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is XLA running out of device memory (RESOURCE_EXHAUSTED)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def _answers(assistant, items: list[tuple[int, tuple]], batch_size: int, **options) -> dict:
    """Greedy answers to `[(index, (conversation, images))]` as `{index: answer}`, in batches padded
    to `batch_size`. A batch the device has no memory for is halved and tried again (logged); a
    single question that still does not fit gets a `_NoMemory` instead of an answer. Other errors
    are raised."""
    conversations, images = (list(x) for x in zip(*(question for _, question in items)))
    try:
        answers = assistant.generate_batch(conversations, images, batch_size=batch_size, **options)
        return {index: answer for (index, _), answer in zip(items, answers)}
    except jax.errors.JaxRuntimeError as error:
        if not out_of_memory(error):
            raise
        if batch_size == 1:
            return {items[0][0]: _NoMemory(f"out of device memory even alone ({str(error).splitlines()[0]})")}
        half = (batch_size + 1) // 2
        log.warning("evaluate: out of device memory at batch size %d; trying again at %d", batch_size, half)
        return {**_answers(assistant, items[:half], half, **options),
                **(_answers(assistant, items[half:], half, **options) if items[half:] else {})}


class ProgressFile:
    """The results of a long evaluation as they come (jsonl, after a header line naming its settings),
    so that a run that was stopped goes on where it was: `done()` gives the results of the whole
    batches written before, when the settings are the same. In a bucket (gs://), where an object
    cannot be appended to, each append writes the file whole again (one upload per batch)."""

    def __init__(self, path: str | os.PathLike, settings: dict, batch_size: int):
        self.path, self.settings, self.batch_size = as_path(path, "--output"), settings, batch_size
        self._text = None  # a gs:// file's text, as last written

    def done(self) -> list[dict]:
        """Results saved by an earlier run with these settings, whole batches only; [] otherwise."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            return []
        if header != self.settings:
            return []
        results = []
        for line in lines[1:]:
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:  # the line a kill cut short, and what follows
                break
        return results[:len(results) // self.batch_size * self.batch_size]

    def start(self, done: list[dict]):
        """Rewrites the file with the header and the results kept (a fresh file without them)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._text = "".join(json.dumps(r) + "\n" for r in [self.settings, *done])
        self.path.write_text(self._text)

    def append(self, results: list[dict]):
        lines = "".join(json.dumps(r) + "\n" for r in results)
        if is_url(self.path):
            self._text += lines
            self.path.write_text(self._text)
            return
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def remove(self):
        self.path.unlink(missing_ok=True)


def training_evaluation(config, model_config, tokenizer, data_dir, mesh):
    """Held-out evaluation for a training run (`train.loop.train`'s `evaluation`): a function
    `(model parameters) -> report` scoring cached greedy answers on `config.data.eval_source` (exact
    match, VQA accuracy, ANLS), generated on the training mesh (every process takes part; each gets
    the whole report). Its compiled programs are kept from one call to the next."""
    records, base_dir = load_records(epath.Path(data_dir) / config.data.eval_source, config.train.eval_samples)
    assistant = None

    def evaluate(params) -> dict:
        nonlocal assistant
        if assistant is None:
            loaded = LoadedModel(model_config, params, tokenizer, training_image_processor(config), "training")
            assistant = Assistant(loaded, dtype=jnp.dtype(config.model.dtype), mesh=mesh)
        else:
            assistant.generator.use_params(params)
        return evaluate_records(assistant, records, base_dir, max_new_tokens=config.train.max_new_tokens,
                                split=config.train.eval_split)
    return evaluate
