"""A Hugging Face `tokenizer.json` tokenizer (the `tokenizers` library), with the interface of our
sentencepiece `Tokenizer`: what Idefics3 (Llama 3's byte-level BPE) and SmolVLM (SmolLM2's) ship.

    tokenizer = JsonTokenizer("SmolVLM-256M/tokenizer.json")   # tokenizer_config.json read beside it

The text is cut at special tokens and encoded by the library exactly as transformers'
`PreTrainedTokenizerFast` encodes it (its own pre-tokenizer, model and post-processor: a BOS where
the tokenizer's template puts one). Which tokens are BOS, EOS and padding comes from
`tokenizer_config.json` when it is there (`bos_token`, `eos_token`, `pad_token`), else from the
arguments.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from etils import epath
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from idefics_jax.data.tokenizer import Tokenizer, disarmed, special_pattern

# A checkpoint directory's tokenizer, in order of preference: Idefics2 ships both (its sentencepiece
# model encodes a prompt's pieces one by one as the whole text), Idefics3 and SmolVLM the JSON only.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _token(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class JsonTokenizer:
    def __init__(self, path: str | os.PathLike | None = None, *, json_text: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 add_bos: bool = True, add_eos: bool = False):
        if json_text is None:
            if path is None:
                raise ValueError("JsonTokenizer needs a tokenizer.json path or its text")
            file = epath.Path(path)
            json_text = file.read_text()
            config_file = file.parent / "tokenizer_config.json"
            if config_file.exists():
                config = json.loads(config_file.read_text())
                bos_token = bos_token or _token(config.get("bos_token"))
                eos_token = eos_token or _token(config.get("eos_token"))
                pad_token = pad_token or _token(config.get("pad_token"))
        self._state = (json_text, bos_token, eos_token, pad_token, add_bos, add_eos)
        self.backend = Backend.from_str(json_text)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.special_tokens = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        self._ids = {name: self.backend.token_to_id(token) if token else None
                     for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token))}
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token and self._ids[name] is None:
                raise ValueError(f"The {name} token {token!r} is not in the vocabulary of this tokenizer.json")
        self._split = special_pattern(self.special_tokens)

    def __getstate__(self):  # picklable for data-loader worker processes
        return self._state

    def __setstate__(self, state):
        json_text, bos, eos, pad, add_bos, add_eos = state
        self.__init__(json_text=json_text, bos_token=bos, eos_token=eos, pad_token=pad, add_bos=add_bos,
                      add_eos=add_eos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        """The padding token's id, else the EOS's, else 0."""
        return next((i for i in (self._ids["pad"], self._ids["eos"]) if i is not None), 0)

    @property
    def eos_token(self) -> str:
        """The end-of-sequence token as text, which a document's text ends with."""
        if self.eos_id is None:
            raise ValueError("This tokenizer has no end-of-sequence token (tokenizer_config.json's eos_token)")
        return self.backend.id_to_token(self.eos_id)

    def files(self) -> dict[str, bytes]:
        """The files that hold this tokenizer, by name: `tokenizer.json` and the special tokens'
        roles in `tokenizer_config.json` (what the constructor reads back)."""
        json_text, bos, eos, pad, _, _ = self._state
        roles = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v}
        return {"tokenizer.json": json_text.encode(), "tokenizer_config.json": json.dumps(roles, indent=2).encode()}

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"'{token}' is not a token of this vocabulary")
        return token_id

    def disarm(self, text: str) -> str:
        """`text` with every special token's spelling broken by an invisible word joiner after its
        first character (see `Tokenizer.disarm`)."""
        return disarmed(self._split, text)

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None,
               at_start: bool = True) -> list[int]:
        """Token ids of `text`: the tokenizer's special tokens (a BOS where its template puts one)
        unless `add_bos=False`. `at_start` is accepted for the interface: byte-level tokenizers encode a
        continuation as they encode a start."""
        ids = self.backend.encode(text, add_special_tokens=self.add_bos if add_bos is None else add_bos).ids
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text; ids past the vocabulary decode to nothing."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def tokenizer_path(directory: epath.Path) -> epath.Path:
    """The tokenizer file of a checkpoint or data directory (`TOKENIZER_FILES`, the first there)."""
    for name in TOKENIZER_FILES:
        if (directory / name).exists():
            return directory / name
    return directory / TOKENIZER_FILES[0]


def open_tokenizer(path: str | os.PathLike) -> Tokenizer | JsonTokenizer:
    """A sentencepiece `.model` or a `tokenizer.json` (its `tokenizer_config.json` beside it), by name."""
    path = epath.Path(path)
    return JsonTokenizer(path) if path.name.endswith(".json") else Tokenizer(path)


def train_json_tokenizer(texts, vocab_size: int, special_tokens, *, bos_token: str | None = None) -> str:
    """Trains a byte-level BPE tokenizer (Llama 3's and SmolLM2's kind) and returns its tokenizer.json
    text: `special_tokens` take the first ids, in order; a `bos_token` is put before every text by
    its template (as Llama 3's), none otherwise (as SmolLM2's). For synthetic data and tests."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts), trainer)
    if bos_token is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", special_tokens=[(bos_token, backend.token_to_id(bos_token))])
    return backend.to_str()
