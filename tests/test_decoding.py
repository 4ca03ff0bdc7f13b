"""The text decoder and autoregressive decoding: cached decoding equals full recomputation (logits and tokens, greedy
and beam search), beam search is exhaustive search when the beam holds every sequence and greedy with one beam,
sampling keeps to its top-k / top-p set and its key, EOS stops and pads, the prefix-LM and cross-attention masks
hold, and the sharded decoder on 8 devices gives the tokens of one device."""

import functools
import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.config import DEFAULT_RULES
from mmjax.models import decoding
from mmjax.models.decoder import TextDecoder, cache_partition_specs, decoder_logits_fn
from mmjax.runtime import sharding as shd

B, LP, N, M, MEDIA_DIM = 4, 5, 6, 5, 24
T = LP + N  # cache positions
VOCAB = 13
PROMPT_LEN = np.array([5, 3, 1, 4])
PREFIX_LEN = np.array([2, 3, 0, 1])  # within each prompt
NEVER = 99  # an eos id no model emits: decoding runs all N steps
DECODER = dict(vocab_size=VOCAB, max_len=16, width=32, depth=2, num_heads=2, mlp_dim=64, vocab_multiple=8)
CACHE_RULES = (("cache_batch", ("data", "fsdp")), ("cache_sequence", None), ("cache_heads", "tensor"),
               ("cache_kv", None), ("act_vocab", "tensor"))


def _rules():
    """The project's rules: they place the decoding cache and the logits (batch over data/fsdp, heads and vocab
    over tensor)."""
    assert set(CACHE_RULES) <= set(DEFAULT_RULES)
    return tuple(DEFAULT_RULES)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.integers(3, VOCAB, size=(B, T)).astype(np.int32)
    prompts = np.where(np.arange(LP)[None] < PROMPT_LEN[:, None], seq[:, :LP], 0).astype(np.int32)
    media = rng.normal(size=(B, M, MEDIA_DIM)).astype(np.float32)
    media_mask = np.ones((B, M), bool)
    media_mask[1, 3:] = False
    media_mask[3, :] = False  # no media at all: no cross-attention update
    return seq, prompts, media, media_mask


@pytest.fixture(scope="module")
def model():
    """A decoder with cross-attention in its second block, its params and data, a jitted full pass."""
    decoder = TextDecoder(cross_attention_every=2, **DECODER)
    seq, prompts, media, media_mask = _data()
    params = nn.meta.unbox(decoder.init(jax.random.key(0), jnp.asarray(seq), media=media, media_mask=media_mask))
    full = jax.jit(lambda p, tokens, media, media_mask, prefix: decoder.apply(
        p, tokens, media=media, media_mask=media_mask, prefix_len=prefix))
    return dict(decoder=decoder, params=params, seq=seq, prompts=prompts, media=media, media_mask=media_mask,
                full=full)


def _cache(m):
    return m["decoder"].init_cache(B, T, media=m["media"], media_mask=m["media_mask"], prefix_len=PREFIX_LEN)


@pytest.fixture(scope="module")
def greedy_run(model):
    """Cached greedy decoding (eos a traced argument, so one program serves every eos id)."""
    fn = jax.jit(lambda p, prompts, cache, eos: decoding.greedy(
        decoder_logits_fn(model["decoder"]), p, prompts, cache, max_new_tokens=N, eos_id=eos))
    return fn, fn(model["params"], model["prompts"], _cache(model), NEVER)


def _full_greedy(m):
    """Greedy decoding by full recomputation: the whole decoder on the growing sequences at every step."""
    buf = np.zeros((B, T), np.int32)
    buf[:, :LP] = m["prompts"]
    tokens, scores = np.zeros((B, N), np.int32), np.zeros(B)
    for t in range(N):
        logits = np.asarray(m["full"](m["params"], buf, m["media"], m["media_mask"], PREFIX_LEN))
        for b in range(B):
            row = logits[b, PROMPT_LEN[b] + t - 1]
            tokens[b, t] = buf[b, PROMPT_LEN[b] + t] = np.argmax(row)
            scores[b] += jax.nn.log_softmax(row)[tokens[b, t]]
    return tokens, scores


def test_cached_logits_equal_the_full_pass(model):
    """Prompt pass over right-padded prompts, then one token at a time at each row's own position: the logits
    equal the full pass's at every position (prefix-LM and media included)."""
    m, seq = model, model["seq"]
    step = jax.jit(lambda p, tokens, cache, pos: m["decoder"].apply(p, tokens, pos, cache))
    want = np.asarray(m["full"](m["params"], seq, m["media"], m["media_mask"], PREFIX_LEN))
    logits, cache = step(m["params"], m["prompts"], _cache(m), np.zeros(B, np.int32))
    assert cache.media is None and all(c.cross_attn is not None for c in cache.layers[1:])
    for b in range(B):
        np.testing.assert_allclose(logits[b, :PROMPT_LEN[b]], want[b, :PROMPT_LEN[b]], atol=1e-5, rtol=0)
    for j in range(N):
        pos = PROMPT_LEN + j
        logits, cache = step(m["params"], seq[np.arange(B), pos][:, None], cache, pos.astype(np.int32))
        np.testing.assert_allclose(logits[:, 0], want[np.arange(B), pos], atol=1e-5, rtol=0)
    assert np.all(want[..., VOCAB:] == np.finfo(np.float32).min)  # padding rows of the table are never tokens


def test_untied_decoder_without_media_caches_exactly():
    decoder = TextDecoder(tie_embedding=False, **DECODER)
    seq = jnp.asarray(_data(1)[0])
    params = decoder.init(jax.random.key(1), seq)
    assert "logits" in params["params"]
    step = jax.jit(lambda p, tokens, pos, cache: decoder.apply(p, tokens, pos, cache))
    want = jax.jit(decoder.apply)(params, seq)
    logits, cache = step(params, seq[:, :3], jnp.zeros(B, jnp.int32), decoder.init_cache(B, T))
    got = [logits]
    for t in range(3, T):
        logits, cache = step(params, seq[:, t:t + 1], jnp.full(B, t, jnp.int32), cache)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=1e-5, rtol=0)


def test_cached_greedy_equals_full_recomputation(model, greedy_run):
    _, out = greedy_run
    tokens, scores = _full_greedy(model)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_array_equal(out.lengths, np.full(B, N))
    np.testing.assert_allclose(out.scores, scores, atol=1e-4, rtol=1e-5)
    assert np.all(np.asarray(out.tokens) < VOCAB)


def test_eos_stops_and_pads(model, greedy_run):
    fn, out = greedy_run
    free = np.asarray(out.tokens)
    eos = int(free[0, 2])  # a token row 0 emits by step 2
    got = fn(model["params"], model["prompts"], _cache(model), eos)
    for b in range(B):
        hits = np.flatnonzero(free[b] == eos)
        length = hits[0] + 1 if hits.size else N
        np.testing.assert_array_equal(got.tokens[b, :length], free[b, :length])
        assert np.all(np.asarray(got.tokens[b, length:]) == 0) and int(got.lengths[b]) == length


def _scripted(search, prompts, script):
    """`search` over a model whose next token after position p of row b is script[b, p] (logit 10, others 0):
    the script is the model's cache, so beams carry their row's. -> (the Generation, how often the model ran)."""
    calls = []

    def logits_fn(params, tokens, cache, position):
        jax.debug.callback(lambda: calls.append(1))
        index = position[:, None] + jnp.arange(tokens.shape[1])[None]
        return 10.0 * jax.nn.one_hot(jnp.take_along_axis(cache, index, axis=1), 6), cache

    out = jax.jit(lambda p, c: search(logits_fn, None, p, c, max_new_tokens=8, eos_id=2))(prompts, script)
    jax.effects_barrier()
    return out, len(calls)


def test_loop_stops_when_every_row_has_ended():
    """Rows end at EOS after 2, 4 and 1 tokens: greedy decoding (and beam search with one beam) runs 3 steps
    after the prompt pass, not 7; finished rows are padded."""
    script = np.array([[4, 2, 5, 5, 5, 5, 5, 5, 5, 5, 5],  # prompt of 1 (position 0): emits 4, 2
                       [3, 3, 4, 5, 4, 2, 5, 5, 5, 5, 5],  # prompt of 3: emits 4, 5, 4, 2
                       [3, 2, 5, 5, 5, 5, 5, 5, 5, 5, 5]])  # prompt of 2: emits 2
    prompts = np.array([[1, 0, 0], [1, 3, 3], [1, 3, 0]], np.int32)
    want = [[4, 2, 0, 0, 0, 0, 0, 0], [4, 5, 4, 2, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0]]
    out, calls = _scripted(decoding.greedy, prompts, script)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, [2, 4, 1])
    assert calls == 4  # the prompt pass and 3 steps
    for beams in (1, 2):
        out, calls = _scripted(functools.partial(decoding.beam_search, beam_size=beams), prompts, script)
        np.testing.assert_array_equal(out.tokens[:, 0], want)
        np.testing.assert_array_equal(out.lengths[:, 0], [2, 4, 1])
        assert calls == 4 if beams == 1 else calls <= 8


def _exhaustive(decoder, params, prompts, prompt_len, vocab, n, alpha, eos):
    """Every continuation of n tokens (cut after the first EOS), scored as beam search scores: the best-first
    list of (score, tokens) per row."""
    seqs = np.array(list(itertools.product(range(vocab), repeat=n)), np.int32)
    apply = jax.jit(decoder.apply)
    results = []
    for b, plen in enumerate(prompt_len):
        full = np.zeros((len(seqs), prompts.shape[1] + n), np.int32)  # right-padded: the causal mask hides pads
        full[:, :plen], full[:, plen:plen + n] = prompts[b, :plen], seqs
        logp = np.asarray(jax.nn.log_softmax(apply(params, full)))
        best = {}
        for i, s in enumerate(seqs):
            hits = np.flatnonzero(s == eos)
            length = hits[0] + 1 if hits.size else n
            total = sum(logp[i, plen + t - 1, s[t]] for t in range(length))
            best[tuple(s[:length])] = total / float(decoding.length_penalty(length, alpha))
        results.append(sorted(((v, k) for k, v in best.items()), reverse=True))
    return results


def test_beam_search_holding_every_sequence_is_exhaustive_search():
    vocab, n, alpha, eos = 4, 3, 0.6, 2
    decoder = TextDecoder(**dict(DECODER, vocab_size=vocab, vocab_multiple=1, max_len=8))
    prompts = np.array([[1, 3, 3], [1, 3, 0]], np.int32)
    params = decoder.init(jax.random.key(2), jnp.asarray(prompts))
    k = vocab ** n
    out = jax.jit(lambda p, c: decoding.beam_search(decoder_logits_fn(decoder), p, prompts, c, max_new_tokens=n,
                                                    beam_size=k, alpha=alpha, eos_id=eos))(
        params, decoder.init_cache(2, 3 + n))
    for b, ranked in enumerate(_exhaustive(decoder, params, prompts, [3, 2], vocab, n, alpha, eos)):
        found = int(np.sum(np.isfinite(out.scores[b])))
        assert found == len(ranked)  # every distinct sequence, no more
        np.testing.assert_allclose(out.scores[b, :found], [s for s, _ in ranked], atol=1e-5, rtol=0)
        best = np.zeros(n, np.int32)
        best[:len(ranked[0][1])] = ranked[0][1]
        np.testing.assert_array_equal(out.tokens[b, 0], best)
        assert int(out.lengths[b, 0]) == len(ranked[0][1])


def _recompute_fn(decoder):
    """A logits_fn without a cache: its 'cache' is the token buffer [rows,T] with each row's media and prefix,
    and every call runs the whole decoder on the buffer."""
    def logits_fn(params, tokens, cache, position):
        buf, media, media_mask, prefix = cache
        buf = jax.vmap(lambda row, new, start: jax.lax.dynamic_update_slice(row, new, (start,)))(buf, tokens, position)
        logits = decoder.apply(params, buf, media=media, media_mask=media_mask, prefix_len=prefix)
        index = position[:, None] + jnp.arange(tokens.shape[1])[None]
        return jnp.take_along_axis(logits, index[:, :, None], axis=1), (buf, media, media_mask, prefix)
    return logits_fn


@pytest.fixture(scope="module")
def beam_run(model, greedy_run):
    """Cached beam search (2 beams, GNMT alpha 0.6) whose EOS is a token greedy decoding emits at step 1."""
    eos = int(np.asarray(greedy_run[1].tokens)[0, 1])
    run = functools.partial(decoding.beam_search, max_new_tokens=N, beam_size=2, alpha=0.6, eos_id=eos)
    out = jax.jit(lambda p, c: run(decoder_logits_fn(model["decoder"]), p, model["prompts"], c))(
        model["params"], _cache(model))
    return run, out


def test_cached_beam_search_equals_beam_search_by_full_recomputation(model, beam_run):
    m, (run, cached) = model, beam_run
    buffer = (np.zeros((B, T), np.int32), m["media"], m["media_mask"], PREFIX_LEN)
    recomputed = jax.jit(lambda p, c: run(_recompute_fn(m["decoder"]), p, m["prompts"], c))(m["params"], buffer)
    np.testing.assert_array_equal(cached.tokens, recomputed.tokens)
    np.testing.assert_array_equal(cached.lengths, recomputed.lengths)
    np.testing.assert_allclose(cached.scores, recomputed.scores, atol=1e-5, rtol=0)
    assert np.all(np.diff(np.asarray(cached.scores), axis=1) <= 0)  # best first
    assert np.any(np.asarray(cached.lengths) < N)  # some beams ended at EOS


def test_one_beam_is_greedy(model, greedy_run):
    fn, free = greedy_run
    eos = int(np.asarray(free.tokens)[1, 1])
    greedy = fn(model["params"], model["prompts"], _cache(model), eos)
    beam = jax.jit(lambda p, c: decoding.beam_search(decoder_logits_fn(model["decoder"]), p, model["prompts"], c,
                                                     max_new_tokens=N, beam_size=1, eos_id=eos))(
        model["params"], _cache(model))
    np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
    np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
    np.testing.assert_allclose(beam.scores[:, 0], greedy.scores, atol=1e-5, rtol=0)


def test_sampling_top_k_one_is_greedy_and_the_key_fixes_the_tokens(model, greedy_run):
    m, (_, greedy) = model, greedy_run
    fn = decoder_logits_fn(m["decoder"])
    top1 = jax.jit(lambda p, c, key: decoding.sample(fn, p, m["prompts"], c, key, max_new_tokens=N,
                                                     temperature=0.7, top_k=1, eos_id=NEVER))
    np.testing.assert_array_equal(top1(m["params"], _cache(m), jax.random.key(3)).tokens, greedy.tokens)
    nucleus = jax.jit(lambda p, c, key: decoding.sample(fn, p, m["prompts"], c, key, max_new_tokens=N,
                                                        temperature=1.5, top_p=0.95, eos_id=NEVER).tokens)
    a, again, other = (nucleus(m["params"], _cache(m), jax.random.key(s)) for s in (4, 4, 5))
    np.testing.assert_array_equal(a, again)
    assert np.any(np.asarray(a) != np.asarray(other))
    assert np.all(np.asarray(a) < VOCAB)


def _allowed(row, temperature, top_k, top_p):
    """The tokens top-k then top-p may keep, and their renormalised probabilities (float64 reference)."""
    z = row.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = order[:top_k] if top_k else order
    p = np.exp(z[keep] - z[keep].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    assert top_p == 1.0 or np.min(np.abs(np.cumsum(p) - top_p)) > 1e-3  # no boundary float32 could round across
    keep, p = keep[before < top_p], p[before < top_p]
    return keep, p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (1.0, 0, 0.7), (0.5, 0, 0.8),
                                                     (2.0, 5, 0.6)])
def test_top_k_and_top_p_draw_only_and_all_of_their_set(temperature, top_k, top_p):
    row = np.random.default_rng(7).normal(size=10).astype(np.float32) * 0.7
    keep, probs = _allowed(row, temperature, top_k, top_p)
    assert 1 < len(keep) < 10
    kept = np.isfinite(np.asarray(decoding.filter_logits(row / temperature, top_k, top_p)))
    np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(keep))
    keys = jax.random.split(jax.random.key(8), 4000)
    draws = np.asarray(jax.vmap(lambda k: decoding.sample_tokens(k, row, temperature, top_k, top_p))(keys))
    assert set(draws.tolist()) <= set(keep.tolist())
    freq = np.bincount(draws, minlength=10)[keep] / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)


def test_prefix_lm_mask(model):
    m, seq = model, model["seq"].copy()
    prefix = np.array([3, 4, 0, 2])
    base = np.asarray(m["full"](m["params"], seq, m["media"], m["media_mask"], prefix))
    after = seq.copy()
    after[np.arange(B), prefix] = (seq[np.arange(B), prefix] - 2) % (VOCAB - 3) + 3  # the first token after it
    changed = np.asarray(m["full"](m["params"], after, m["media"], m["media_mask"], prefix))
    for b in range(B):
        np.testing.assert_array_equal(changed[b, :prefix[b]], base[b, :prefix[b]])
        assert np.abs(changed[b, prefix[b]:] - base[b, prefix[b]:]).max() > 1e-4
    inside = seq.copy()
    inside[np.arange(B), np.maximum(prefix - 1, 1)] = 3 + (seq[np.arange(B), np.maximum(prefix - 1, 1)] - 2) % 10
    seen = np.asarray(m["full"](m["params"], inside, m["media"], m["media_mask"], prefix))
    for b in (0, 1, 3):  # position 0 sees the prefix's last token
        assert np.abs(seen[b, 0] - base[b, 0]).max() > 1e-4
    np.testing.assert_array_equal(seen[2, 0], base[2, 0])  # no prefix: causal


def test_cross_attention_sees_media_and_not_masked_media(model):
    m = model
    run = functools.partial(m["full"], m["params"], m["seq"], media_mask=m["media_mask"], prefix=PREFIX_LEN)
    base = np.asarray(run(media=m["media"]))
    other = m["media"].copy()
    other[:, 4] += 1.0  # valid in rows 0 and 2, masked in rows 1 and 3
    changed = np.asarray(run(media=other))
    for b in (0, 2):
        assert np.abs(changed[b] - base[b]).max() > 1e-4
    np.testing.assert_array_equal(changed[1], base[1])
    np.testing.assert_array_equal(np.asarray(run(media=m["media"] * 3.0))[3], base[3])  # no media: unchanged


def test_gated_cross_attention_is_the_identity_at_init(model):
    decoder = TextDecoder(cross_attention_every=1, cross_attention_gated=True, **DECODER)
    media = model["media"]
    params = decoder.init(jax.random.key(9), jnp.asarray(model["seq"]), media=media)
    assert "xattn_gate" in params["params"]["transformer"]["block_0"]
    a, b = (decoder.apply(params, model["seq"], media=x) for x in (media, media + 1.0))
    np.testing.assert_array_equal(a, b)


def _spec(a):
    return tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))


def test_sharded_decoding_on_8_devices_equals_one_device(model, greedy_run, beam_run):
    m, (_, greedy), (beam, plain_beam) = model, greedy_run, beam_run
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    rules = _rules()
    decoder, fn = m["decoder"], decoder_logits_fn(m["decoder"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: decoder.init(jax.random.key(0), jnp.asarray(m["seq"]), media=m["media"]))
        param_shardings = shd.tree_shardings(boxed, mesh, rules)
        params = jax.device_put(m["params"], param_shardings)
        cache = _cache(m)
        cache_shardings = nn.logical_to_mesh_sharding(cache_partition_specs(cache), mesh, rules)
        cache = jax.device_put(cache, cache_shardings)
        k = cache.layers[0].self_attn.k
        assert _spec(k) == (("data", "fsdp"), "tensor", None, None)  # batch over the batch axes, heads over tensor
        assert k.addressable_shards[0].data.shape == (1, 1, T, 16)
        prefill = jax.jit(lambda p, c: fn(p, jnp.asarray(m["prompts"]), c, jnp.zeros(B, jnp.int32))[1])
        filled = prefill(params, cache)
        assert _spec(filled.layers[0].self_attn.k) == _spec(filled.layers[1].cross_attn.v) == _spec(k)
        sharded_greedy = jax.jit(lambda p, c: decoding.greedy(fn, p, m["prompts"], c, max_new_tokens=N,
                                                              eos_id=NEVER))(params, cache)
        sharded_beam = jax.jit(lambda p, c: beam(fn, p, m["prompts"], c))(params, cache)
    np.testing.assert_array_equal(sharded_greedy.tokens, greedy.tokens)
    np.testing.assert_array_equal(sharded_beam.tokens, plain_beam.tokens)
    np.testing.assert_allclose(sharded_beam.scores, plain_beam.scores, atol=1e-5, rtol=0)


def test_decoding_benchmark_reports_every_batch_and_the_open_clip_row_where_asked(tmp_path, capsys, monkeypatch):
    # benchmarks/decoding.py at a small shape: one row per batch size, speed-ups that are the ratios of its own
    # medians, open_clip's generate only at the batch sizes named (here a stand-in that records its batch: the
    # real one takes ~10 s to build); the script checks cached == recomputed tokens itself.
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        'decoding_bench', os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'decoding.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'd.json'
    asked = []
    monkeypatch.setattr(bench, 'open_clip_fn', lambda args: asked.append(args.batch) or (lambda: time.sleep(0.01)))
    assert bench.main(['--batch', '1', '2', '--depth', '1', '--new', '3', '--repeats', '1',
                       '--open-clip-batch', '2', '--out', str(out)]) == 0
    import json
    report = json.loads(out.read_text())
    assert list(report['by_batch']) == ['1', '2'] and report['shape']['new'] == 3
    for batch, runs in report['by_batch'].items():
        for name in ('cached', 'recompute'):
            assert runs[name]['tokens_per_s'] == pytest.approx(int(batch) * 3 / runs[name]['median_s'])
        assert runs['cached_speedup_vs_recompute'] == pytest.approx(
            runs['recompute']['median_s'] / runs['cached']['median_s'])
    assert 'open_clip' not in report['by_batch']['1']
    assert asked == [2] and report['by_batch']['2']['cached_speedup_vs_open_clip'] == pytest.approx(
        report['by_batch']['2']['open_clip']['median_s'] / report['by_batch']['2']['cached']['median_s'])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (['1'], ['2'])]
    assert [r[0] for r in rows] == ['1', '2'] and rows[0][-1] == '-'
