"""CLIP's byte-level BPE in pure Python (needs the `regex` package), plus a tiny merges trainer.

Format: a merges file (plain or .gz) whose first line may be '#version: ...' and whose other lines are
'left right' pairs in merge order (CLIP's `bpe_simple_vocab_16e6.txt.gz`). The vocabulary is CLIP's: the
256 byte symbols, the same with '</w>' (end of word), then one token per merge.

Text handling as CLIP: HTML unescaped twice, whitespace collapsed, lower-cased, split by CLIP's regex into
words / numbers (one digit each) / punctuation runs, each word BPE-merged over its UTF-8 bytes. (CLIP also runs
`ftfy.fix_text`; mojibake is not repaired here.) The special strings '<|startoftext|>' / '<|endoftext|>' in
input text are removed: BOS / EOT are placed by `Tokenizer.encode` only.

Ids follow the project convention (mmjax/data/tokenizers.py): 0 pad, 1 BOS (<start_of_text>), 2 EOT
(<end_of_text>), vocabulary token v -> v + 3; vocab_size = 512 + merges + 3. With CLIP's own file and
max_merges=48894 that is 49,409 (CLIP's ids differ: its SOT/EOT are 49406/49407 and tokens are not shifted).
"""

from __future__ import annotations

import collections
import functools
import gzip
import html
from collections.abc import Iterable, Sequence

import regex

from mmjax import storage
from mmjax.data.tokenizer_base import Tokenizer

START_OF_TEXT = '<|startoftext|>'
END_OF_TEXT = '<|endoftext|>'
END_OF_WORD = '</w>'
_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    codes, extra = printable[:], 0
    byte_values = printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, codes)))


def clean_text(text: str) -> str:
    """CLIP's basic_clean + whitespace_clean + lower (without ftfy)."""
    text = html.unescape(html.unescape(text))
    text = text.replace(START_OF_TEXT, ' ').replace(END_OF_TEXT, ' ')
    return ' '.join(text.split()).lower()


def pre_tokenize(text: str) -> list[str]:
    """Cleaned text -> byte-encoded words (each a str of byte symbols)."""
    encoder = bytes_to_unicode()
    return [''.join(encoder[b] for b in word.encode('utf-8')) for word in _PATTERN.findall(clean_text(text))]


def load_merges(path: str, max_merges: int | None = None) -> list[tuple[str, str]]:
    """Merge pairs of a merges file (first `max_merges` of them when given)."""
    data = storage.read_bytes(path)  # a local file or a gs:// / s3:// URL
    lines = (gzip.decompress(data) if path.endswith('.gz') else data).decode('utf-8').split('\n')
    if lines and '#version' in lines[0]:  # CLIP's file starts with '"bpe_simple_vocab_16e6.txt#version: 0.2'
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f'{path}: merge line {number + 1} is {line!r}, expected two symbols')
        merges.append((parts[0], parts[1]))
    return merges[:max_merges] if max_merges is not None else merges


def _word_symbols(word: str) -> tuple[str, ...]:
    return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


def train_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges (most frequent adjacent pair first, ties by the pair itself) over CLIP-pre-tokenized
    words of `texts`. Small-corpus trainer for tests and toy vocabularies."""
    words = collections.Counter(_word_symbols(w) for text in texts for w in pre_tokenize(text))
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for symbols, count in words.items():
            merged[_merge(symbols, best)] += count
        words = merged
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_merges(path: str, merges: Sequence[tuple[str, str]]) -> None:
    storage.write_text_atomic(path, '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))


class ClipBpeTokenizer(Tokenizer):
    """CLIP BPE from a merges file. `max_len` is CLIP's context length (77 for CLIP); truncation keeps EOT."""

    _OFFSET = 3

    def __init__(self, merges_path: str, max_len: int, max_merges: int | None = None):
        super().__init__(max_len)
        merges = load_merges(merges_path, max_merges)
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges]
        self._encoder = {token: i for i, token in enumerate(vocab)}  # later duplicates keep the last id
        self._decoder = dict(enumerate(vocab))
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._vocab_len = len(vocab)
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return self._vocab_len + self._OFFSET

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        symbols = _word_symbols(word)
        while len(symbols) > 1:
            ranked = [(self._ranks.get(pair, float('inf')), pair) for pair in zip(symbols, symbols[1:])]
            rank, pair = min(ranked)
            if rank == float('inf'):
                break
            symbols = _merge(symbols, pair)
        return symbols

    def text_to_ids(self, text: str) -> list[int]:
        return [self._encoder[token] + self._OFFSET for word in pre_tokenize(text) for token in self._bpe(word)]

    def ids_to_text(self, ids: Sequence[int]) -> str:
        """Words are joined with single spaces (CLIP's decode): 'a, b' comes back as 'a , b'."""
        text = ''.join(self._decoder[i - self._OFFSET] for i in ids if self._OFFSET <= i < self.vocab_size)
        words = [bytes(self._byte_decoder[c] for c in piece) for piece in text.split(END_OF_WORD)]
        return b' '.join(w for w in words if w).decode('utf-8', errors='replace')
