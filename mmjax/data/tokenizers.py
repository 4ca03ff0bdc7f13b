"""Text tokenizers behind one small interface.

Every tokenizer turns a list of strings into a fixed-length int32 array [N, max_len] with the project's
convention: pad id 0, BOS (= CLS) at position 0, EOT as the last non-pad token (kept under truncation).
New tokenizers (SentencePiece, HF, CLIP-BPE) subclass `Tokenizer` and register a constructor in
`TOKENIZERS`; `get_tokenizer(text_cfg)` picks one by `text_cfg.tokenizer` (default 'bytes').
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOT_ID = 2


class Tokenizer(abc.ABC):
    """Interface: `encode`, `decode`, `vocab_size`, `pad_id`, `bos_id`, `eot_id`, `max_len`."""

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eot_id: int = EOT_ID

    def __init__(self, max_len: int):
        if max_len < 2:
            raise ValueError(f'max_len must be >= 2 to hold BOS and EOT, got {max_len}')
        self.max_len = int(max_len)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, specials included."""

    @abc.abstractmethod
    def text_to_ids(self, text: str) -> list[int]:
        """Content ids of one string (no specials, no truncation)."""

    @abc.abstractmethod
    def ids_to_text(self, ids: Sequence[int]) -> str:
        """Inverse of `text_to_ids` on content ids."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """list[str] -> int32 [N, max_len]: BOS, content ids (truncated to max_len - 2), EOT, pads."""
        if isinstance(texts, str):
            raise TypeError('encode expects a list of strings, got a single str')
        out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        for i, text in enumerate(texts):
            ids = [self.bos_id] + self.text_to_ids(text)[: self.max_len - 2] + [self.eot_id]
            out[i, : len(ids)] = ids
        return out

    def decode(self, tokens: np.ndarray) -> list[str]:
        """int [N, L] (or [L]) -> list[str]; specials and pads are dropped, decoding stops at EOT."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        texts = []
        for row in tokens.tolist():
            content = []
            for t in row:
                if t == self.eot_id:
                    break
                if t not in (self.pad_id, self.bos_id):
                    content.append(t)
            texts.append(self.ids_to_text(content))
        return texts


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: byte b -> id b + 3; ids 0/1/2 are pad/BOS/EOT; vocab_size 259."""

    _OFFSET = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self._OFFSET

    def text_to_ids(self, text: str) -> list[int]:
        return [b + self._OFFSET for b in text.encode('utf-8')]

    def ids_to_text(self, ids: Sequence[int]) -> str:
        data = bytes(i - self._OFFSET for i in ids if self._OFFSET <= i < self.vocab_size)
        return data.decode('utf-8', errors='replace')


def _byte_tokenizer(text_cfg) -> Tokenizer:
    return ByteTokenizer(max_len=text_cfg.max_len)


def _tokenizer_path(text_cfg, name: str) -> str:
    path = text_cfg.get('tokenizer_path', '') or ''
    if not path:
        raise ValueError(f'config.model.text.tokenizer={name!r} needs config.model.text.tokenizer_path '
                         f'(the model / tokenizer.json / merges file)')
    return path


def _sentencepiece_tokenizer(text_cfg) -> Tokenizer:
    from mmjax.data.subword import SentencePieceTokenizer  # lazy: optional package `sentencepiece`
    return SentencePieceTokenizer(_tokenizer_path(text_cfg, 'sentencepiece'), max_len=text_cfg.max_len)


def _hf_tokenizer(text_cfg) -> Tokenizer:
    from mmjax.data.subword import HFTokenizer  # lazy: optional package `tokenizers`
    return HFTokenizer(_tokenizer_path(text_cfg, 'hf'), max_len=text_cfg.max_len)


def _clip_bpe_tokenizer(text_cfg) -> Tokenizer:
    from mmjax.data.bpe import ClipBpeTokenizer  # lazy: imports this module
    return ClipBpeTokenizer(_tokenizer_path(text_cfg, 'clip_bpe'), max_len=text_cfg.max_len,
                            max_merges=text_cfg.get('bpe_max_merges', None))


# name (`config.model.text.tokenizer`) -> constructor taking `config.model.text`. 'byte' aliases 'bytes'.
# The file-based ones read `config.model.text.tokenizer_path` (and 'clip_bpe' optionally `bpe_max_merges`).
TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    'bytes': _byte_tokenizer,
    'byte': _byte_tokenizer,
    'sentencepiece': _sentencepiece_tokenizer,
    'hf': _hf_tokenizer,
    'clip_bpe': _clip_bpe_tokenizer,
}


def get_tokenizer(text_cfg) -> Tokenizer:
    """Tokenizer for `config.model.text` (reads `tokenizer` (default 'bytes'), `max_len`, `vocab_size`).

    Raises ValueError when the name is unknown or the model's `vocab_size` is smaller than the tokenizer's.
    """
    name = text_cfg.get('tokenizer', 'bytes')
    if name not in TOKENIZERS:
        raise ValueError(f'config.model.text.tokenizer={name!r} is unknown; choose one of {sorted(TOKENIZERS)}')
    tokenizer = TOKENIZERS[name](text_cfg)
    model_vocab = text_cfg.get('vocab_size', None)
    if model_vocab is not None and model_vocab < tokenizer.vocab_size:
        raise ValueError(
            f'config.model.text.vocab_size={model_vocab} is smaller than the {name!r} tokenizer vocabulary '
            f'({tokenizer.vocab_size})')
    return tokenizer
