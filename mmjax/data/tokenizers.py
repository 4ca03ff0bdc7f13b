"""Text tokenizers behind one small interface.

Every tokenizer turns a list of strings into a fixed-length int32 array [N, max_len] with the project's
convention: pad id 0, BOS (= CLS) at position 0, EOT as the last non-pad token (kept under truncation).
New tokenizers (SentencePiece, HF, CLIP-BPE) subclass `Tokenizer` and register a constructor in
`TOKENIZERS`; `get_tokenizer(text_cfg)` picks one by `text_cfg.tokenizer` (default 'bytes').
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmjax.config import BOS_ID, EOT_ID, PAD_ID
from mmjax.data.bpe import ClipBpeTokenizer
from mmjax.data.subword import HFTokenizer, SentencePieceTokenizer
from mmjax.data.tokenizer_base import Tokenizer


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
    return SentencePieceTokenizer(_tokenizer_path(text_cfg, 'sentencepiece'), max_len=text_cfg.max_len)


def _hf_tokenizer(text_cfg) -> Tokenizer:
    return HFTokenizer(_tokenizer_path(text_cfg, 'hf'), max_len=text_cfg.max_len)


def _clip_bpe_tokenizer(text_cfg) -> Tokenizer:
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


__all__ = ["BOS_ID", "EOT_ID", "PAD_ID", "TOKENIZERS", "ByteTokenizer", "Tokenizer", "get_tokenizer"]


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
