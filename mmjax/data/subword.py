"""Subword tokenizers from model files, behind `mmjax.data.tokenizers.Tokenizer`, and the embedding check.

  SentencePieceTokenizer  a SentencePiece `.model` file (pip package `sentencepiece`)
  HFTokenizer             a Hugging Face `tokenizers` `tokenizer.json` (pip package `tokenizers`)

Both shift the model's ids by 3 so that 0 / 1 / 2 stay pad / BOS / EOT (the project convention): model id m ->
m + 3, vocab_size = model vocabulary + 3. The model's own special tokens (unk, bos, eos, ...) are never emitted
for content, except unk for characters the model cannot represent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import numpy as np

from mmjax import storage
from mmjax.data.tokenizer_base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model file -> project ids (model id + 3)."""

    _OFFSET = 3

    def __init__(self, model_file: str, max_len: int):
        super().__init__(max_len)
        import sentencepiece  # optional package (the `text` extra)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=storage.read_bytes(model_file))  # local or URL

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size()) + self._OFFSET

    def text_to_ids(self, text: str) -> list[int]:
        return [i + self._OFFSET for i in self._sp.encode(text, out_type=int)]

    def ids_to_text(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) - self._OFFSET for i in ids if self._OFFSET <= i < self.vocab_size])


class HFTokenizer(Tokenizer):
    """Hugging Face `tokenizers` tokenizer.json -> project ids (model id + 3); its post-processor's special
    tokens are not added (BOS / EOT are the project's)."""

    _OFFSET = 3

    def __init__(self, tokenizer_file: str, max_len: int):
        super().__init__(max_len)
        import tokenizers  # optional package (the `text` extra)
        self._tok = tokenizers.Tokenizer.from_str(storage.read_text(tokenizer_file))  # local or URL
        self._tok.no_truncation()
        self._tok.no_padding()

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True)) + self._OFFSET

    def text_to_ids(self, text: str) -> list[int]:
        return [i + self._OFFSET for i in self._tok.encode(text, add_special_tokens=False).ids]

    def ids_to_text(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) - self._OFFSET for i in ids if self._OFFSET <= i < self.vocab_size],
                                skip_special_tokens=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """As `Tokenizer.encode`, with the Rust batch encoder."""
        if isinstance(texts, str):
            raise TypeError('encode expects a list of strings, got a single str')
        out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        for row, encoding in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_id] + [i + self._OFFSET for i in encoding.ids[: self.max_len - 2]] + [self.eot_id]
            out[row, : len(ids)] = ids
        return out


def text_embedding_rows(params: Any) -> int:
    """Rows of the text tower's token-embedding table (params['text'][...]['token_embed']['embedding'])."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params) if hasattr(params, 'unfreeze') else params)
    rows = [np.shape(getattr(v, 'value', v))[0] for path, v in flat.items()
            if path and path[0] == 'text' and 'token_embed' in path and path[-1] in ('embedding', 'value')]
    if len(rows) != 1:
        raise ValueError(f"expected one text token-embedding table under params['text'], found {len(rows)}")
    return int(rows[0])


def check_embedding_vocab(tokenizer: Tokenizer, params: Any) -> None:
    """Raises ValueError naming model.text.vocab_size when the text embedding has fewer rows than the tokenizer
    has ids (a token id past the table would be silently clamped by the gather)."""
    rows = text_embedding_rows(params)
    if rows < tokenizer.vocab_size:
        raise ValueError(f'the text token embedding has {rows} rows but the {type(tokenizer).__name__} has '
                         f'{tokenizer.vocab_size} ids: set config.model.text.vocab_size >= {tokenizer.vocab_size}')
