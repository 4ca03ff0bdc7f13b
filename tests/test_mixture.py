"""Weighted mixtures: MixtureDataset layout (exact per-block counts, stated tolerance, determinism, random
access) and a two-corpus mixture through make_train_loader (shares, global stream, resume)."""

import json

import grain.python as grain
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data import pipeline, sources, synthetic
from mmjax.data.tokenizers import ByteTokenizer
from mmjax.training import preflight


def members_of(dataset, n):
    return np.array([dataset.locate(k)[0] for k in range(n)])


def test_block_counts_are_exact_and_rounding_sums_to_the_block():
    np.testing.assert_array_equal(sources.mixture_counts([0.7, 0.3]), [700, 300])
    np.testing.assert_array_equal(sources.mixture_counts([1, 1, 1]), [334, 333, 333])
    assert sources.mixture_counts([5, 2, 0.01]).sum() == 1000
    for bad in ([0.5, 0.0], [1.0, -2.0], [float('nan'), 1.0], []):
        with pytest.raises(ValueError, match='> 0'):
            sources.mixture_counts(bad)
    with pytest.raises(ValueError, match='1/1000'):
        sources.mixture_counts([1.0, 1e-4])


def test_mixture_shares_follow_the_weights_within_the_stated_tolerance():
    parents = [grain.MapDataset.range(10**9).map(lambda x, d=d: (d, x)) for d in range(3)]
    weights = [0.5, 0.3, 0.2]
    mix = sources.MixtureDataset(parents, weights, seed=7)
    owners = members_of(mix, 5000)
    np.testing.assert_array_equal(np.bincount(owners, minlength=3), [2500, 1500, 1000])  # 5 whole blocks
    n = 2345  # tolerance over N positions: 0.0005 + MIXTURE_BLOCK / N  (module docstring)
    shares = np.bincount(owners[:n], minlength=3) / n
    assert np.all(np.abs(shares - weights) <= 0.0005 + sources.MIXTURE_BLOCK / n)
    for window in (slice(0, 200), slice(1000, 1200)):  # interleaved, not one member after another
        assert len(set(owners[window].tolist())) == 3
    np.testing.assert_array_equal(mix.consumed(n), np.bincount(owners[:n], minlength=3))
    np.testing.assert_array_equal(mix.consumed(5000), [2500, 1500, 1000])


def test_mixture_is_a_deterministic_bijection_onto_the_member_streams():
    parents = [grain.MapDataset.range(10**9).map(lambda x, d=d: (d, x)) for d in range(2)]
    mix = sources.MixtureDataset(parents, [2.0, 1.0], seed=3)
    elements = [mix[k] for k in range(3100)]
    for d in range(2):  # member d's elements appear in its own stream order 0, 1, 2, ...
        mine = [x for m, x in elements if m == d]
        assert mine == list(range(len(mine)))
    again = sources.MixtureDataset(parents, [2.0, 1.0], seed=3)
    assert [again[k] for k in (2999, 5, 1500, 17)] == [elements[k] for k in (2999, 5, 1500, 17)]  # any order
    other = sources.MixtureDataset(parents, [2.0, 1.0], seed=4)
    assert [other[k] for k in range(100)] != elements[:100]
    assert list(mix[1000:1005]) == elements[1000:1005]  # slicing (the pipeline's stream[start:])


@pytest.fixture(scope='module')
def two_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp('mix')
    for name, prefix, num, seed in (('alpha', 'alpha: ', 30, 1), ('beta', 'beta: ', 12, 2)):
        synthetic.write_webdataset(str(root / name), num, per_shard=num, seed=seed, caption_prefix=prefix,
                                   min_side=20, max_side=48)
        (root / f'{name}.json').write_text(json.dumps({'name': name, 'format': 'webdataset', 'paths': f'{name}/*.tar'}))
    (root / 'tfds').mkdir()
    return root


def mixture_config(root, weights=(3.0, 1.0), seed=0):
    c = config_lib.base_config()
    c.seed = seed
    c.data.update(name='mixture', data_dir=str(root / 'tfds'),
                  mixture=((str(root / 'alpha.json'), weights[0]), (str(root / 'beta.json'), weights[1])))
    c.model.image.image_size = 16
    c.model.text.max_len = 80
    c.train.batch_size = 40
    c.eval.zeroshot = False  # caption corpora give the zero-shot evaluator no dataset
    return c


def prefixes(batches):
    texts = ByteTokenizer(80).decode(np.concatenate([b['text'] for b in batches]))
    return np.array([t.split(':')[0] for t in texts])


def test_mixture_through_the_loader(two_corpora):
    cfg = mixture_config(two_corpora)
    preflight.check(cfg, 8)
    it = pipeline.make_train_loader(cfg, 0, 1)
    batches = [next(it) for _ in range(25)]  # 1,000 examples = one mixture block
    names = prefixes(batches)
    assert set(names) == {'alpha', 'beta'}
    assert (names == 'alpha').sum() == 750 and (names == 'beta').sum() == 250  # exact per whole block
    first = prefixes(batches[:5])  # the first 200 examples already hold both (interleaved, not blockwise)
    assert 0 < (first == 'beta').sum() < 200
    stats = it.stats()
    assert stats['data/share/alpha'] == pytest.approx(0.75) and stats['data/share/beta'] == pytest.approx(0.25)
    assert stats['data/epoch/alpha'] == pytest.approx(750 / 30) and stats['data/epoch/beta'] == pytest.approx(250 / 12)
    assert stats['data/epoch'] == pytest.approx(1000 / 42)
    # global stream: 2 processes' batches concatenate to the 1-process batch; resume is exact
    halves = [pipeline.make_train_loader(cfg, p, 2) for p in range(2)]
    for h in halves:
        h.set_state({'examples_seen': 960})
    parts = [next(h) for h in halves]
    for k in parts[0]:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batches[24][k])
    resumed = pipeline.make_train_loader(cfg, 0, 1)
    resumed.set_state(it.get_state())
    more = next(resumed)
    again = pipeline.make_train_loader(cfg, 0, 1)
    again.set_state({'examples_seen': 1000})
    np.testing.assert_array_equal(next(again)['image'], more['image'])


def test_mixture_weights_and_seed_change_the_stream(two_corpora):
    even = pipeline.make_train_loader(mixture_config(two_corpora, (1.0, 1.0)), 0, 1)
    names = prefixes([next(even) for _ in range(25)])
    assert (names == 'alpha').sum() == 500 and (names == 'beta').sum() == 500
    a = next(pipeline.make_train_loader(mixture_config(two_corpora), 0, 1))
    b = next(pipeline.make_train_loader(mixture_config(two_corpora, seed=5), 0, 1))
    assert not np.array_equal(a['text'], b['text'])


def test_mixture_in_a_worker_process_gives_the_same_stream(two_corpora):
    reference = pipeline.make_train_loader(mixture_config(two_corpora), 0, 1)
    expected = [next(reference) for _ in range(2)]
    cfg = mixture_config(two_corpora)
    cfg.data.num_workers = 1
    it = pipeline.make_train_loader(cfg, 0, 1)
    try:
        for batch in expected:
            got = next(it)
            for k in batch:
                np.testing.assert_array_equal(got[k], batch[k])
    finally:
        it.close()
