"""The LLaMA tokenizer with LLaVA's two extra tokens, and an exact SentencePiece-semantics encoder.

`load_tokenizer` returns a Hugging Face tokenizer (for decoding, saving with a checkpoint, ...)
with ``<image>`` (id 32000) and ``<pad>`` (id 32001) added the way llava-hf checkpoints have them.

`text_encoder(tokenizer)` gives the `TextEncoder` the data path tokenizes with. It reproduces, id
for id, what the original LLaVA code gets from the slow SentencePiece ``LlamaTokenizer``
(``use_fast=False``), with character offsets, using the fast BPE model of the same vocabulary:

* text is cut at the special tokens ``<s>``, ``</s>``, ``<unk>`` (which map to their ids);
* legacy tokenizers put a ``▁`` (SentencePiece's dummy prefix) before every piece of text,
  including the text right after a special token (``</s>USER`` -> ``</s> ▁US ER``);
* non-legacy tokenizers put it only before the text at the start of a call
  (``</s>USER`` -> ``</s> USER``), and drop it when the call starts with a special token.

Each call of the original (each chunk of the prompt around ``<image>``) is one `encode_chunks`
chunk here, so the lone ``▁`` (29871) tokens on both sides of the image come out as they do there.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import weakref
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

from llava_jax.paths import as_path, copy_file, is_url

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
IGNORE_INDEX = -100

TOKENIZER_ENV = "LLAVA_JAX_TOKENIZER"
_SPIECE = "\u2581"  # "▁", SentencePiece's whitespace symbol
_INNER_SPACE = re.compile(f"[^{_SPIECE}]{_SPIECE}")
_WORD = re.compile(f"{_SPIECE}*[^{_SPIECE}]+|{_SPIECE}+")  # a run of "▁" with the text after it
_CACHE_LIMIT = 200_000  # words kept per encoder (then the cache starts over)


def default_tokenizer_dir() -> pathlib.Path:
    """The vendored LLaMA tokenizer: ``$LLAVA_JAX_TOKENIZER`` if set, else ``<repo>/third_party/llama_tokenizer``."""
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2] / "third_party" / "llama_tokenizer"


def load_tokenizer(path: str | os.PathLike | None = None, *, legacy: bool | None = None):
    """Load a LLaMA-family tokenizer and add LLaVA's ``<image>`` and ``<pad>`` tokens.

    Args:
      path: a Hugging Face tokenizer folder (``tokenizer.json`` and/or ``tokenizer.model``);
        default `default_tokenizer_dir()`.
      legacy: override the folder's ``legacy`` setting (None keeps it; LLaMA / Vicuna v0-v1.3
        folders are legacy, Vicuna v1.5 folders are not).
    Returns:
      A ``transformers`` tokenizer with ``<image>`` = `IMAGE_TOKEN_ID`, ``<pad>`` = `PAD_TOKEN_ID`
      and ``pad_token = "<pad>"``. A folder that already has both tokens (a llava-hf checkpoint) is
      accepted as is; any other id for them is an error.
    """
    from transformers import AddedToken, AutoTokenizer

    if path is None and is_url(os.environ.get(TOKENIZER_ENV, "")):
        path = os.environ[TOKENIZER_ENV]
    if path is not None and is_url(path):
        path = _tokenizer_files(path)
    folder = pathlib.Path(path) if path is not None else default_tokenizer_dir()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {str(folder)!r} does not exist; pass a Hugging Face tokenizer folder "
            f"or set ${TOKENIZER_ENV}"
        )
    kwargs = {} if legacy is None else {"legacy": legacy}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if PAD_TOKEN not in vocab:
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    else:
        tokenizer.pad_token = PAD_TOKEN
    got = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    if got != [IMAGE_TOKEN_ID, PAD_TOKEN_ID]:
        raise ValueError(
            f"tokenizer at {str(folder)!r} gives {IMAGE_TOKEN}={got[0]} and {PAD_TOKEN}={got[1]}, but LLaVA "
            f"needs {IMAGE_TOKEN_ID} and {PAD_TOKEN_ID}: use a plain 32000-piece LLaMA tokenizer or a "
            "llava-hf one"
        )
    return tokenizer


def _tokenizer_files(url) -> pathlib.Path:
    """The small files of a tokenizer folder at a URL (JSON, SentencePiece model, chat template),
    copied into a temporary folder; weights beside them are not downloaded."""
    import tempfile

    src = as_path(url)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(src)!r} does not exist; pass a Hugging Face tokenizer folder")
    dst = pathlib.Path(tempfile.mkdtemp(prefix="llava_jax_tokenizer_"))
    for f in src.iterdir():
        if f.suffix in (".json", ".model", ".jinja", ".txt") and not f.is_dir():
            copy_file(f, dst / f.name)
    return dst


def _is_legacy(tokenizer) -> bool:
    value = getattr(tokenizer, "legacy", None)
    if isinstance(value, bool):
        return value
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    return "prepend_scheme=first" not in repr(pre)


class _Pieces(NamedTuple):
    """Per piece of `TextEncoder.encode_chunks`' input: its unit count, `base` (source position of its
    first character: one before the text when a "▁" prefix is added), `floor` (where its text starts)
    and the index of its chunk."""

    units: list[int]
    base: list[int]
    floor: list[int]
    chunk: list[int]


class TextEncoder:
    """Tokenizes text exactly as the slow SentencePiece ``LlamaTokenizer`` does, with offsets.

    Build one with `text_encoder` (cached per tokenizer). Thread-safe, and picklable for
    data-loader worker processes.

    Text between special tokens is cut before each run of ``▁`` into words. No SentencePiece
    piece has a ``▁`` after another character, so no token crosses such a cut and the words can be
    encoded one at a time, each once: encoded words are cached. (A vocabulary with such pieces is
    encoded a whole text run at a time instead.)

    Attributes:
      legacy: whether every piece of text after a special token gets the ``▁`` prefix.
      bos_id, eos_id: ids of ``<s>`` and ``</s>``.
    """

    def __init__(self, tokenizer, *, legacy: bool | None = None):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            raise ValueError(
                "the LLaVA data path needs a LLaMA-family SentencePiece tokenizer (BPE with byte "
                f"fallback); got a {model.get('type')} model"
            )
        # The bare BPE model: no normalizer, pre-tokenizer, added tokens or templates; whitespace
        # and prefixes are handled here.
        core = {
            "version": spec.get("version", "1.0"),
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": None,
            "model": model,
        }
        specials = {}
        for token in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token):
            if token:
                specials[str(token)] = int(tokenizer.convert_tokens_to_ids(str(token)))
        self._setup(
            core_json=json.dumps(core),
            legacy=_is_legacy(tokenizer) if legacy is None else bool(legacy),
            bos_id=int(tokenizer.bos_token_id),
            eos_id=int(tokenizer.eos_token_id),
            specials=specials,
            by_words=not any(_INNER_SPACE.search(piece) for piece in model["vocab"]),
        )

    def _setup(self, core_json, legacy, bos_id, eos_id, specials, by_words):
        import tokenizers

        self._args = (core_json, legacy, bos_id, eos_id, specials, by_words)
        self._core = tokenizers.Tokenizer.from_str(core_json)
        self.legacy, self.bos_id, self.eos_id = legacy, bos_id, eos_id
        self._by_words = by_words
        # A special token is a cache entry under a key no text word can be ("\0" + token).
        self._special_keys = {t: "\0" + t for t in specials}
        # Cache entry: ((id, start, end) * n flattened, n tokens, n characters).
        self._special_entries = {"\0" + t: ((i, 0, len(t)), 1, len(t)) for t, i in specials.items()}
        self._split = _special_splitter(specials)
        self._cache: dict[str, tuple] = dict(self._special_entries)

    def __reduce__(self):
        return (_rebuild_encoder, self._args)

    def encode_chunks(self, chunks: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Tokenize each chunk as one separate call of the slow tokenizer, without BOS.

        Args:
          chunks: strings, each tokenized on its own (text around ``<image>`` placeholders).
        Returns:
          One ``(ids, starts, ends)`` triple of int64 arrays [T] per chunk; ``starts``/``ends`` are
          character offsets into that chunk. A token that is only the ``▁`` prefix gets an empty
          span at the start of the text it precedes.
        """
        keys, pieces = self._pieces(chunks)
        if not keys:
            empty = np.zeros(0, np.int64)
            return [(empty, empty, empty) for _ in chunks]
        entries = self._entries(keys)
        triples = np.fromiter(chain.from_iterable(map(itemgetter(0), entries)), np.int64).reshape(-1, 3)
        ids, rel_s, rel_e = triples[:, 0], triples[:, 1], triples[:, 2]
        n_tok = np.fromiter(map(itemgetter(1), entries), np.int64, len(entries))
        n_chr = np.fromiter(map(itemgetter(2), entries), np.int64, len(entries))

        units = np.asarray(pieces.units, np.int64)
        first = np.cumsum(units) - units  # index of each piece's first unit
        before = np.cumsum(n_chr) - n_chr  # characters before each unit, over all units
        unit_base = np.repeat(np.asarray(pieces.base, np.int64) - before[first], units) + before
        unit_floor = np.repeat(np.asarray(pieces.floor, np.int64), units)
        starts = np.maximum(rel_s + np.repeat(unit_base, n_tok), np.repeat(unit_floor, n_tok))
        ends = np.maximum(rel_e + np.repeat(unit_base, n_tok), np.repeat(unit_floor, n_tok))

        piece_tokens = np.add.reduceat(n_tok, first)
        per_chunk = np.bincount(np.asarray(pieces.chunk), weights=piece_tokens, minlength=len(chunks))
        cuts = [0] + np.cumsum(per_chunk.astype(np.int64)).tolist()
        return [(ids[i:j], starts[i:j], ends[i:j]) for i, j in zip(cuts[:-1], cuts[1:], strict=True)]

    def _pieces(self, chunks: Sequence[str]) -> tuple[list[str], _Pieces]:
        """Cut the chunks into pieces (a special token, or the text between two), each a list of units
        (cache keys). Returns (the units of all pieces in order, the pieces)."""
        keys: list[str] = []
        pieces = _Pieces([], [], [], [])
        for c, chunk in enumerate(chunks):
            if not self.legacy:
                chunk = chunk.replace(_SPIECE, " ")
            pos = 0
            for k, part in enumerate(self._split.split(chunk)):
                if k % 2:
                    units = (self._special_keys[part],)
                    base = pos
                elif part:
                    prefix = self.legacy or k == 0
                    piece = (_SPIECE if prefix else "") + part.replace(" ", _SPIECE)
                    units = _WORD.findall(piece) if self._by_words else (piece,)
                    base = pos - prefix
                else:
                    continue
                keys.extend(units)
                pieces.units.append(len(units))
                pieces.base.append(base)
                pieces.floor.append(pos)
                pieces.chunk.append(c)
                pos += len(part)
        return keys, pieces

    def _entries(self, keys: list[str]) -> list[tuple]:
        """The cache entry of each unit, encoding the units not yet cached in one batch."""
        # A full cache is replaced, never cleared, so a call running in another thread keeps
        # its own complete dict.
        cache = self._cache
        if not self._by_words or len(cache) > _CACHE_LIMIT:
            cache = self._cache = dict(self._special_entries)
        new = list(set(keys).difference(cache))
        if new:
            for word, enc in zip(new, self._core.encode_batch(new, add_special_tokens=False), strict=True):
                flat = tuple(chain.from_iterable((i, s, e) for i, (s, e) in zip(enc.ids, enc.offsets, strict=True)))
                cache[word] = (flat, len(enc.ids), len(word))
        return list(map(cache.__getitem__, keys))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of one string, as the slow tokenizer's ``tokenizer(text).input_ids``."""
        ids = self.encode_chunks([text])[0][0].tolist()
        return [self.bos_id] + ids if add_bos else ids


def _rebuild_encoder(*args):
    encoder = TextEncoder.__new__(TextEncoder)
    encoder._setup(*args)
    return encoder


def _special_splitter(specials: dict[str, int]) -> re.Pattern:
    """A pattern whose ``split`` alternates text and special tokens (longest token first)."""
    if not specials:
        return re.compile("(?!)")  # never matches
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")


_ENCODERS: weakref.WeakKeyDictionary[Any, TextEncoder] = weakref.WeakKeyDictionary()


def text_encoder(tokenizer) -> TextEncoder:
    """The `TextEncoder` for a Hugging Face tokenizer (built once, then cached); passes a `TextEncoder` through."""
    if isinstance(tokenizer, TextEncoder):
        return tokenizer
    try:
        encoder = _ENCODERS.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable
        return TextEncoder(tokenizer)
    if encoder is None:
        encoder = _ENCODERS[tokenizer] = TextEncoder(tokenizer)
    return encoder
