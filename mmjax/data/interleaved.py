"""Interleaved image-text sequences from the labelled digits, for task 'flamingo'.

A sequence is BOS, then one chunk per image: `<image>` + the caption + `<|endofchunk|>`, the caption being the
digit's number word and a full stop ('<image>seven.<|endofchunk|><image>two.<|endofchunk|>...'); a few-shot prompt
ends with a last `<image>` whose caption the model writes. The text-only pretraining corpus is the same captions
without images: BOS 'seven. two. four. ...'.

`<image>` and `<|endofchunk|>` are two new token ids just above the tokenizer's (`special_ids`); the model's
`text.vocab_size` must hold them. Training sequences are packed from the labels of a batch of single images
(`chunk_table` + `pack`, jax.numpy, so the step builds them on the devices from the 'captions' stream); the
few-shot evaluation builds its prompts on the host (`Interleaver.prompt`, `episodes`).

Made-up labels (`MADEUP_WORDS`) are words that no training text contains: the in-context test names two digit
classes with them and asks for the query's name.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from mmjax.config import BOS_ID, PAD_ID
from mmjax.data.digits import CLASS_NAMES

IMAGE_TOKEN, END_OF_CHUNK = '<image>', '<|endofchunk|>'
MADEUP_WORDS = ('dax', 'blicket', 'wug', 'zorp', 'toma', 'fep', 'kiki', 'gazzer')


def special_ids(tokenizer) -> tuple[int, int]:
    """(`<image>` id, `<|endofchunk|>` id): the two ids just above the tokenizer's vocabulary."""
    return int(tokenizer.vocab_size), int(tokenizer.vocab_size) + 1


class Interleaver:
    """Token ids of interleaved sequences with `tokenizer` (`mmjax.data.tokenizers`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_id, self.eoc_id = special_ids(tokenizer)

    def chunk(self, word: str, text_only: bool = False) -> list[int]:
        """One chunk's ids: `<image>` word. `<|endofchunk|>`, or text-only 'word. ' (a space ends it)."""
        if text_only:
            return self.tokenizer.text_to_ids(f'{word}. ')
        return [self.image_id] + self.tokenizer.text_to_ids(f'{word}.') + [self.eoc_id]

    def prompt(self, words: Sequence[str]) -> list[int]:
        """A few-shot prompt: BOS, a chunk per support word, and the query's `<image>`."""
        ids = [BOS_ID]
        for word in words:
            ids += self.chunk(word)
        return ids + [self.image_id]

    def parse(self, text: str) -> list[int]:
        """An interleaved string ('<image> seven. <|endofchunk|><image>') -> BOS and its ids; the two markers
        become their ids, the text between them the tokenizer's (spaces next to a marker are dropped)."""
        ids = [BOS_ID]
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(self.image_id)
            for j, piece in enumerate(part.split(END_OF_CHUNK)):
                if j:
                    ids.append(self.eoc_id)
                if piece.strip():
                    ids += self.tokenizer.text_to_ids(piece.strip())
        return ids

    def caption(self, ids: Sequence[int]) -> str:
        """Generated ids -> their text, up to `<|endofchunk|>` (specials dropped)."""
        out = []
        for t in ids:
            if t == self.eoc_id:
                break
            out.append(int(t))
        return self.tokenizer.ids_to_text(out)

    def chunk_table(self, words: Sequence[str], text_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The chunks of `words` (`chunk`) as (ids int32 [W, Lc] padded with PAD, lengths int32 [W])."""
        chunks = [self.chunk(w, text_only) for w in words]
        table = np.full((len(chunks), max(map(len, chunks))), PAD_ID, np.int32)
        for i, c in enumerate(chunks):
            table[i, :len(c)] = c
        return table, np.array([len(c) for c in chunks], np.int32)


def pack(table: jnp.ndarray, lengths: jnp.ndarray, labels: jnp.ndarray, max_len: int) -> jnp.ndarray:
    """Sequences from chunk tables: table int [W,Lc] and lengths int [W] (`Interleaver.chunk_table`), labels int
    [N,S] (each sequence's S chunks, in order) -> tokens int32 [N, max_len]: BOS, the chunks back to back, PAD
    after them (cut at max_len). Works on device (jax.numpy) and on host arrays."""
    table, lengths, labels = jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(labels)
    chunk_len = lengths[labels]  # [N,S]
    starts = 1 + jnp.cumsum(chunk_len, axis=1) - chunk_len  # [N,S]: position of each chunk's first token
    pos = jnp.arange(max_len, dtype=jnp.int32)[None, :, None]  # [1,L,1]
    inside = (pos >= starts[:, None, :]) & (pos < (starts + chunk_len)[:, None, :])  # [N,L,S]
    which = jnp.argmax(inside, axis=2)  # [N,L]: the chunk holding each position
    offset = pos[:, :, 0] - jnp.take_along_axis(starts, which, axis=1)
    ids = table[jnp.take_along_axis(labels, which, axis=1), jnp.clip(offset, 0, table.shape[1] - 1)]
    tokens = jnp.where(jnp.any(inside, axis=2), ids, PAD_ID)
    return tokens.at[:, 0].set(BOS_ID).astype(jnp.int32)


def episodes(query_labels: np.ndarray, support_labels: np.ndarray, shots: int, seed: int,
             madeup: bool = False) -> tuple[np.ndarray, list[list[str]], list[str]]:
    """Few-shot episodes, one per query: (support indices int [Q, shots] into support_labels, each episode's
    support words, each query's expected word).

    madeup=False: `shots` support images of random classes, named by their number words (digits.CLASS_NAMES).
    madeup=True: a 2-way episode: the query's class and another random class, each named by a distinct random
    `MADEUP_WORDS` entry; shots/2 support images of each class in random order (shots even).
    """
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(support_labels == c) for c in range(len(CLASS_NAMES))]
    index, words, answers = np.zeros((len(query_labels), shots), np.int64), [], []
    for q, label in enumerate(np.asarray(query_labels).tolist()):
        if not madeup:
            pick = rng.integers(len(support_labels), size=shots)
            names = dict(enumerate(CLASS_NAMES))
        else:
            other = (label + int(rng.integers(1, len(CLASS_NAMES)))) % len(CLASS_NAMES)
            first, second = rng.choice(len(MADEUP_WORDS), size=2, replace=False)
            names = {label: MADEUP_WORDS[first], other: MADEUP_WORDS[second]}
            classes = rng.permutation(np.repeat([label, other], shots // 2))
            pick = np.array([rng.choice(by_class[c]) for c in classes], np.int64)
        index[q] = pick
        words.append([names[int(support_labels[i])] for i in pick])
        answers.append(names[label])
    return index, words, answers
