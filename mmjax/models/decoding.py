"""Autoregressive generation for any decoder: greedy, sampling (temperature, top-k, top-p) and beam search, each a
prefill of the prompts and then fixed-shape steps in one `lax.while_loop`, all traceable under `jax.jit`.

The model enters as `logits_fn(params, tokens, cache, position) -> (logits, cache)`: tokens int32 [B,L] at
positions position[b] + l (position int32 [B]), logits float [B,L,V] (the next-token scores after each token),
`cache` the model's own pytree, whose every leaf has a leading batch axis [B, ...] (beam search repeats and
reorders its rows). The same function runs the prompts (L = prompt length, position 0) and every step (L = 1).
`models.decoder.decoder_logits_fn` makes it for `TextDecoder` (media and prefix go into its empty cache). A
wrapper makes other decoding rules without touching these loops, e.g. classifier-free guidance: a cache of
2B rows, the wrapper calls the model on `concat([tokens, tokens])` and returns `u + s * (c - u)` of the two
halves' logits (the conditioning differing in the cache's rows).

Prompts are right-padded: row b's prompt is prompts[b, :prompt_len[b]] (default prompt_len: its count of tokens
other than `pad_id`, at least 1), and its generated token t sits at position prompt_len[b] + t; the prompt pass
also writes the padding slots, and the steps overwrite them before any token can see them. The cache must hold
prompts.shape[1] + max_new_tokens positions. A row stops at `eos_id` (kept as its last token, `pad_id` after it);
the loop stops when every row (every batch item, in beam search) is done or after max_new_tokens tokens. Rows
already done still run through the model (fixed shapes), their outputs unused.

Every function returns a `Generation`. Jit with the model function and the options bound, for instance
`jax.jit(functools.partial(greedy, logits_fn, max_new_tokens=32))(params, prompts, cache)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mmjax.config import EOT_ID, PAD_ID
from mmjax.models.transformer import take_rows

LogitsFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class Generation(NamedTuple):
    """What a decoding function returns; beam search adds a beam axis K after B, best beam first.

    tokens: int32 [B,N] ([B,K,N]): the generated tokens, EOS included, then pad_id (N = max_new_tokens).
    lengths: int32 [B] ([B,K]): how many tokens each generated, EOS included.
    scores: float32 [B] ([B,K]): the sum of the model's log-probabilities of those tokens (at temperature 1,
      unfiltered); in beam search divided by `length_penalty` (-inf marks an empty beam).
    """
    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT's length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016), the divisor of a finished beam's
    log-probability: 1 when alpha = 0 (plain log-probability), favouring longer outputs as alpha grows."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., V] -> float32 [..., V] with the excluded tokens at -inf.

    top_k > 0 keeps the k largest logits (and any tied with the k-th); top_p < 1 then keeps the nucleus: the
    most likely tokens, in order, until their probability reaches top_p (the most likely one always). top-k
    comes first and top-p renormalises over what it kept, as in Hugging Face transformers.
    """
    _check_sampling(1.0, top_k, top_p)
    logits = logits.astype(jnp.float32)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return logits


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """One token per row of logits [..., V] -> int32 [...], drawn from softmax(logits / temperature) restricted
    by `filter_logits(top_k, top_p)`; the same `key` draws the same tokens."""
    _check_sampling(temperature, top_k, top_p)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0 (greedy decoding is `greedy`); got {temperature}')
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f'top_k must be >= 0 and top_p in (0, 1]; got {top_k} and {top_p}')


def _prompt_len(prompts: jax.Array, prompt_len: jax.Array | None, pad_id: int) -> jax.Array:
    if prompt_len is None:
        return jnp.maximum(jnp.sum(prompts != pad_id, axis=1), 1).astype(jnp.int32)
    return jnp.asarray(prompt_len, jnp.int32)


def _prefill(logits_fn: LogitsFn, params: Any, prompts: jax.Array, cache: Any,
             prompt_len: jax.Array) -> tuple[jax.Array, Any]:
    """The prompt pass -> (float32 logits after each row's last prompt token [B,V], the cache)."""
    logits, cache = logits_fn(params, prompts, cache, jnp.zeros((prompts.shape[0],), jnp.int32))
    return take_rows(logits, prompt_len - 1)[:, 0].astype(jnp.float32), cache


def _check(max_new_tokens: int, logits: jax.Array) -> None:
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be >= 1; got {max_new_tokens}')
    if logits.shape[-1] < 2:
        raise ValueError(f'decoding needs a vocabulary of at least 2 tokens; logits have {logits.shape[-1]}')


class _TokenState(NamedTuple):
    step: jax.Array  # int32 []: the next token's index t
    tokens: jax.Array  # int32 [B,N]
    lengths: jax.Array  # int32 [B]
    scores: jax.Array  # float32 [B]
    finished: jax.Array  # bool [B]
    cache: Any


def _choose(s: _TokenState, logits: jax.Array, select: Callable[[jax.Array, jax.Array], jax.Array],
            eos_id: int, pad_id: int) -> _TokenState:
    """Token `s.step` of every row from logits float32 [B,V] (`pad_id` in finished rows)."""
    live = ~s.finished
    token = jnp.where(live, select(logits, s.step), pad_id).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return s._replace(step=s.step + 1,
                      tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1),
                      lengths=s.lengths + live, scores=s.scores + jnp.where(live, logp, 0.0),
                      finished=s.finished | (token == eos_id))


def _token_loop(logits_fn: LogitsFn, params: Any, prompts: jax.Array, cache: Any,
                select: Callable[[jax.Array, jax.Array], jax.Array], max_new_tokens: int,
                prompt_len: jax.Array | None, eos_id: int, pad_id: int) -> Generation:
    """Greedy decoding and sampling: select(logits float32 [B,V], t) -> int32 [B] picks token t of each row."""
    prompt_len = _prompt_len(prompts, prompt_len, pad_id)
    logits, cache = _prefill(logits_fn, params, prompts, cache, prompt_len)
    _check(max_new_tokens, logits)
    batch = prompts.shape[0]
    state = _TokenState(jnp.zeros((), jnp.int32), jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                        jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.float32),
                        jnp.zeros((batch,), bool), cache)
    state = _choose(state, logits, select, eos_id, pad_id)

    def cond(s: _TokenState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.finished)

    def body(s: _TokenState) -> _TokenState:
        previous = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B,1]
        logits, cache = logits_fn(params, previous, s.cache, prompt_len + s.step - 1)
        return _choose(s._replace(cache=cache), logits[:, -1].astype(jnp.float32), select, eos_id, pad_id)

    s = jax.lax.while_loop(cond, body, state)
    return Generation(s.tokens, s.lengths, s.scores)


def greedy(logits_fn: LogitsFn, params: Any, prompts: jax.Array, cache: Any, *, max_new_tokens: int,
           prompt_len: jax.Array | None = None, eos_id: int = EOT_ID, pad_id: int = PAD_ID) -> Generation:
    """Greedy decoding: the most likely token at every step (the lowest id among ties).

    prompts int32 [B,Lp] right-padded, prompt_len int [B] | None, cache: the model's empty cache for B rows and
    Lp + max_new_tokens positions (see the module docstring) -> `Generation` with tokens [B,max_new_tokens].
    """
    def select(logits, _):
        return jnp.argmax(logits, axis=-1)
    return _token_loop(logits_fn, params, prompts, cache, select, max_new_tokens, prompt_len, eos_id, pad_id)


def sample(logits_fn: LogitsFn, params: Any, prompts: jax.Array, cache: Any, key: jax.Array, *,
           max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           prompt_len: jax.Array | None = None, eos_id: int = EOT_ID, pad_id: int = PAD_ID) -> Generation:
    """Ancestral sampling: token t of every row drawn by `sample_tokens` with `jax.random.fold_in(key, t)`
    (temperature, then top-k, then top-p), so the same key gives the same tokens; top_k=1 is greedy decoding.
    Arguments and result as `greedy`; scores are the model's own log-probabilities of the drawn tokens."""
    _check_sampling(temperature, top_k, top_p)

    def select(logits, step):
        return sample_tokens(jax.random.fold_in(key, step), logits, temperature, top_k, top_p)
    return _token_loop(logits_fn, params, prompts, cache, select, max_new_tokens, prompt_len, eos_id, pad_id)


class _BeamState(NamedTuple):
    step: jax.Array  # int32 []: the next token's index t
    live_tokens: jax.Array  # int32 [B,K,N]: the beams still growing
    live_scores: jax.Array  # float32 [B,K]: their summed log-probabilities (-inf: none)
    parents: jax.Array  # int32 [B,K]: the live beam of the previous step each one continues
    fin_tokens: jax.Array  # int32 [B,K,N]: the best finished beams
    fin_scores: jax.Array  # float32 [B,K]: their length-normalised scores (-inf: none)
    fin_lengths: jax.Array  # int32 [B,K]
    cache: Any  # rows [B*K], row b*K + k for live beam k of item b


def _best(k: int, scores: jax.Array, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, ...]:
    """The k best of scores [B,M], tokens [B,M,N], lengths [B,M] -> ([B,k], [B,k,N], [B,k]), best first."""
    scores, pick = jax.lax.top_k(scores, k)
    return scores, jnp.take_along_axis(tokens, pick[:, :, None], axis=1), jnp.take_along_axis(lengths, pick, axis=1)


def _beam_step(s: _BeamState, logits: jax.Array, eos_id: int, alpha: float) -> _BeamState:
    """Token `s.step` of the beams from logits float32 [B,K,V]: the 2K best continuations of the live beams by
    summed log-probability; those among the K best that end in EOS join the finished beams (scored by
    `length_penalty`, the K best kept), and the K best that do not end stay live."""
    batch, k, vocab = logits.shape
    candidates = s.live_scores[:, :, None] + jax.nn.log_softmax(logits, axis=-1)
    scores, index = jax.lax.top_k(candidates.reshape(batch, k * vocab), 2 * k)  # [B,2K]
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(s.live_tokens, parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], s.step, axis=2)
    ends = token == eos_id
    finished = jnp.where(ends & (jnp.arange(2 * k) < k), scores / length_penalty(s.step + 1, alpha), -jnp.inf)
    fin_scores, fin_tokens, fin_lengths = _best(
        k, jnp.concatenate([s.fin_scores, finished], axis=1), jnp.concatenate([s.fin_tokens, seqs], axis=1),
        jnp.concatenate([s.fin_lengths, jnp.full(finished.shape, s.step + 1, jnp.int32)], axis=1))
    live_scores, pick = jax.lax.top_k(jnp.where(ends, -jnp.inf, scores), k)
    return s._replace(step=s.step + 1, live_tokens=jnp.take_along_axis(seqs, pick[:, :, None], axis=1),
                      live_scores=live_scores, parents=jnp.take_along_axis(parent, pick, axis=1),
                      fin_tokens=fin_tokens, fin_scores=fin_scores, fin_lengths=fin_lengths)


def _reorder(cache: Any, parents: jax.Array) -> Any:
    """Cache rows [B*K, ...] -> the rows of each beam's parent (parents int [B,K], beams of one item only)."""
    batch, k = parents.shape

    def take(a):
        a = a.reshape((batch, k) + a.shape[1:])
        index = parents.reshape((batch, k) + (1,) * (a.ndim - 2))
        return jnp.take_along_axis(a, index, axis=1).reshape((batch * k,) + a.shape[2:])
    return jax.tree.map(take, cache)


def beam_search(logits_fn: LogitsFn, params: Any, prompts: jax.Array, cache: Any, *, max_new_tokens: int,
                beam_size: int, alpha: float = 0.0, prompt_len: jax.Array | None = None, eos_id: int = EOT_ID,
                pad_id: int = PAD_ID) -> Generation:
    """Beam search with `beam_size` K beams per item in fixed [B*K] rows.

    The prompts run once on B rows, then the cache repeats each row K times. Each step keeps the K best
    growing beams; a beam ending in EOS (when among the step's K best candidates) is finished: kept with score
    log-probability / `length_penalty`(length, alpha) among the K best finished ones, never extended. An item
    is done when its worst kept finished beam scores at least what its best live beam could still reach
    (its log-probability / length_penalty(max_new_tokens), alpha >= 0); at the end the live beams compete with
    the finished ones at their current length. With K = 1 and alpha = 0 this is greedy decoding; with K at
    least V ** max_new_tokens it is exhaustive search.

    Arguments as `greedy` (cache for B rows); returns `Generation` with tokens [B,K,N], lengths and scores
    [B,K], sorted best first.
    """
    if beam_size < 1 or alpha < 0:
        raise ValueError(f'beam_size must be >= 1 and alpha >= 0; got {beam_size} and {alpha}')
    prompt_len = _prompt_len(prompts, prompt_len, pad_id)
    logits, cache = _prefill(logits_fn, params, prompts, cache, prompt_len)
    _check(max_new_tokens, logits)
    (batch, vocab), k, n = logits.shape, beam_size, max_new_tokens
    empty = jnp.full((batch, k, n), pad_id, jnp.int32)
    first = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)  # one live beam until the first step
    state = _BeamState(jnp.zeros((), jnp.int32), empty, jnp.broadcast_to(first, (batch, k)),
                       jnp.zeros((batch, k), jnp.int32), empty, jnp.full((batch, k), -jnp.inf),
                       jnp.zeros((batch, k), jnp.int32), jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), cache))
    state = _beam_step(state, jnp.broadcast_to(logits[:, None], (batch, k, vocab)), eos_id, alpha)
    positions = jnp.repeat(prompt_len, k)

    def cond(s: _BeamState) -> jax.Array:
        reachable = jnp.max(s.live_scores, axis=1) / length_penalty(n, alpha)
        return (s.step < n) & ~jnp.all(jnp.min(s.fin_scores, axis=1) >= reachable)

    def body(s: _BeamState) -> _BeamState:
        cache = _reorder(s.cache, s.parents)
        previous = jax.lax.dynamic_slice_in_dim(s.live_tokens, s.step - 1, 1, axis=2).reshape(batch * k, 1)
        logits, cache = logits_fn(params, previous, cache, positions + s.step - 1)
        logits = logits[:, -1].astype(jnp.float32).reshape(batch, k, vocab)
        return _beam_step(s._replace(cache=cache), logits, eos_id, alpha)

    s = jax.lax.while_loop(cond, body, state)
    live = s.live_scores / length_penalty(s.step, alpha)
    scores, tokens, lengths = _best(k, jnp.concatenate([s.fin_scores, live], axis=1),
                                    jnp.concatenate([s.fin_tokens, s.live_tokens], axis=1),
                                    jnp.concatenate([s.fin_lengths, jnp.full((batch, k), s.step)], axis=1))
    return Generation(tokens, lengths, scores)
