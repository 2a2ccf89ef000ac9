"""A sentencepiece tokenizer with Idefics2's added tokens, tokenizing as transformers does.

The Mistral vocabulary is a sentencepiece BPE model (byte fallback). Idefics2 appends three
tokens, `<fake_token_around_image>`, `<image>`, `<end_of_utterance>` (ids 32000, 32001, 32002
for Mistral's 32,000 pieces). Text is cut at every special token (those three and the model's
`<unk>`, `<s>`, `</s>`); each piece has its spaces written as `▁`, the piece at the very start of
the text gets a `▁` prefix unless it already starts with one (transformers' Metaspace
pre-tokenizer, `prepend_scheme="first"`), and is encoded by the sentencepiece model with its own
dummy prefix turned off. A BOS id starts every sequence (`add_bos`).
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from idefics_jax.data.image_tokens import ADDED_TOKENS

SPACE = "\u2581"  # ▁
WORD_JOINER = "\u2060"  # zero width, no break


def special_pattern(tokens) -> re.Pattern | None:
    """A pattern that cuts text at any of `tokens` (the longest first), keeping them; None for none."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None


def disarmed(pattern: re.Pattern | None, text: str) -> str:
    """`text` with every spelling `pattern` finds broken by an invisible word joiner (U+2060) after
    its first character: encoded again, it gives ordinary pieces, never a special token."""
    if pattern is None:
        return text
    return pattern.sub(lambda match: match.group(0)[0] + WORD_JOINER + match.group(0)[1:], text)


class Tokenizer:
    def __init__(self, model: str | os.PathLike | bytes, *, add_bos: bool = True, add_eos: bool = False,
                 added_tokens: Sequence[str] = ADDED_TOKENS):
        proto = model if isinstance(model, bytes) else epath.Path(model).read_bytes()  # a path, also gs://
        self.model_proto = proto  # the sentencepiece model's bytes, as a tokenizer.model file holds them
        self._init_args = (proto, add_bos, add_eos, tuple(added_tokens))
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        # the same model, without the dummy prefix: we place the `▁` prefix ourselves
        spec = sentencepiece_model_pb2.ModelProto()
        spec.ParseFromString(proto)
        spec.normalizer_spec.add_dummy_prefix = False
        self._raw = spm.SentencePieceProcessor(model_proto=spec.SerializeToString())
        self.add_bos, self.add_eos = add_bos, add_eos
        self.base_vocab_size = self.sp.get_piece_size()
        self.added_tokens = {token: self.base_vocab_size + i for i, token in enumerate(added_tokens)}
        specials = dict(self.added_tokens)
        for token_id in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()):
            if token_id >= 0:
                specials[self.sp.id_to_piece(token_id)] = token_id
        self.special_tokens = specials
        self._split = special_pattern(specials)
        self._id_to_added = {i: t for t, i in self.added_tokens.items()}

    def __getstate__(self):  # picklable for data-loader worker processes
        return self._init_args

    def __setstate__(self, state):
        proto, add_bos, add_eos, added = state
        self.__init__(proto, add_bos=add_bos, add_eos=add_eos, added_tokens=added)

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.added_tokens)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Idefics2 pads with id 0 (`<unk>`)."""
        return max(self.sp.pad_id(), 0)

    @property
    def eos_token(self) -> str:
        """The end-of-sequence token as text (`</s>`), which a document's text ends with."""
        return self.sp.id_to_piece(self.eos_id)

    def files(self) -> dict[str, bytes]:
        """The files that hold this tokenizer, by name, as a checkpoint directory keeps them."""
        return {"tokenizer.model": self.model_proto}

    def disarm(self, text: str) -> str:
        """`text` with every special token's spelling broken by an invisible word joiner (U+2060)
        after its first character: encoded again, it gives ordinary pieces, never a special token.
        For model-written text that goes back into a prompt (a chat's earlier answers), where a
        spelled `<image>` would read as an image placeholder and `</s>` as an end of text."""
        return disarmed(self._split, text)

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        token_id = self.sp.piece_to_id(token)
        if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id):
            raise KeyError(f"'{token}' is not a token of this vocabulary")
        return token_id

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None,
               at_start: bool = True) -> list[int]:
        """Token ids of `text`. `at_start=False` encodes a continuation (no `▁` prefix added)."""
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        offset = 0 if at_start else 1
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self._encode_piece(piece, prepend=offset == 0))
            offset += len(piece)
        if self.add_eos if add_eos is None else add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_piece(self, piece: str, prepend: bool) -> list[int]:
        piece = piece.replace(" ", SPACE)
        if prepend and not piece.startswith(SPACE):
            piece = SPACE + piece
        return self._raw.encode(piece)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text. Ids past the vocabulary (a model's embedding table padded beyond the
        tokenizer's) decode to nothing."""
        out, run = [], []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                continue
            if token_id in self._id_to_added or token_id in (self.bos_id, self.eos_id, self.pad_id):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._id_to_added.get(token_id) or self.sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


def train_tokenizer(texts, vocab_size: int, seed: int = 0) -> bytes:
    """Trains a Mistral-style sentencepiece model (BPE, byte fallback, ids unk=0 bos=1 eos=2).

    For synthetic data and tests: Idefics2 itself uses Mistral's 32,000-piece model.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2, num_threads=1, hard_vocab_limit=False,
    )
    return model.getvalue()
