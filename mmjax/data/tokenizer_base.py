"""The tokenizer interface every text tokenizer implements (ids: pad 0, BOS = CLS 1, EOT 2, owned by
`mmjax.config`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from mmjax.config import BOS_ID, EOT_ID, PAD_ID


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
