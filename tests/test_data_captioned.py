"""The builder-backed pipeline: a webdataset spec / a prepared TFDS dataset through make_train_loader (global
stream across process counts, exact resume, bad-sample stats), config validation of the data section, and
a short training run on a caption corpus (zero-shot skipped, data/* metrics logged)."""

import io
import json
import tarfile

import grain.python as grain
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data import digits, pipeline, synthetic
from mmjax.data.tokenizers import ByteTokenizer
from mmjax.training import preflight

NUM_GOOD = 40


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A webdataset corpus of 40 good JPEG samples (2 shards) + 2 bad ones, its spec file and a data_dir."""
    root = tmp_path_factory.mktemp('corpus')
    synthetic.write_webdataset(str(root / 'shards'), NUM_GOOD, per_shard=20, seed=1, min_side=24, max_side=64)
    with tarfile.open(root / 'shards' / '00002.tar', 'w') as tar:  # one corrupt image, one empty caption
        good, _ = synthetic.photo(np.random.default_rng(5), 24, 40)
        _add(tar, 'bad0.jpg', good[: len(good) // 3])
        _add(tar, 'bad0.txt', b'a truncated jpeg')
        _add(tar, 'bad1.jpg', good)
        _add(tar, 'bad1.txt', b'   ')
        for i in range(20):  # enough good samples that the shard stays under max_bad_fraction
            data, caption = synthetic.photo(np.random.default_rng(100 + i), 24, 40)
            _add(tar, f'extra{i:02d}.jpg', data)
            _add(tar, f'extra{i:02d}.txt', caption.encode())
    spec = root / 'spec.json'
    spec.write_text(json.dumps({'name': 'corpus', 'format': 'webdataset', 'paths': 'shards/*.tar',
                                'limits': {'max_bad_fraction': 0.2}}))
    (root / 'tfds').mkdir()
    return root


def make_config(root, **overrides):
    c = config_lib.base_config()
    c.data.name = 'spec'
    c.data.spec = str(root / 'spec.json')
    c.data.data_dir = str(root / 'tfds')
    c.model.image.image_size = 24
    c.model.text.max_len = 64
    c.train.batch_size = 8
    c.eval.zeroshot = False  # a caption corpus gives the zero-shot evaluator no dataset (a config error)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_spec_stream_batches_hold_dataset_captions(corpus, capsys):
    it = pipeline.make_train_loader(make_config(corpus), 0, 1)
    batches = take(it, 8)  # 64 examples > one epoch of 60
    batch = batches[0]
    assert batch['image'].shape == (8, 24, 24, 3) and batch['image'].dtype == np.float32
    assert batch['text'].shape == (8, 64) and (batch['label'] == -1).all()
    texts = ByteTokenizer(64).decode(np.concatenate([b['text'] for b in batches]))
    assert all(t.startswith('a ') and ' background' in t for t in texts), texts[:4]
    assert 'a truncated jpeg' not in texts
    assert len(set(texts)) > 30  # a shuffle over the 60 kept samples, not a repeat of a few
    stats = it.stats()
    assert stats['data/bad_samples'] == 2.0
    assert stats['data/bad/bad_image'] == 1.0 and stats['data/bad/empty_caption'] == 1.0
    assert stats['data/epoch'] == pytest.approx(64 / 60)
    assert stats['data/bad_fraction'] == pytest.approx(2 / 62)


def test_spec_stream_is_global_and_resumes_exactly(corpus):
    cfg = make_config(corpus)
    reference = take(pipeline.make_train_loader(cfg, 0, 1), 9)  # crosses the epoch boundary at 60
    halves = [pipeline.make_train_loader(cfg, p, 2) for p in range(2)]
    for g in range(3):
        assert_same_batches([concat([next(h) for h in halves])], [reference[g]])
    state = halves[0].get_state()
    assert state == halves[1].get_state() == {'examples_seen': 24, 'epoch': 0}
    one = pipeline.make_train_loader(cfg, 0, 1)
    one.set_state(state)
    assert_same_batches(take(one, 6), reference[3:])
    unaugmented = take(pipeline.make_train_loader(make_config(corpus, **{'data.augment': False}), 0, 1), 1)
    np.testing.assert_array_equal(unaugmented[0]['text'], reference[0]['text'])  # same order and captions
    assert not np.array_equal(unaugmented[0]['image'], reference[0]['image'])  # center crop, not random


def test_spec_stream_checkpoint_round_trip_with_a_worker(corpus, tmp_path):
    from etils import epath
    cfg = make_config(corpus, **{'data.num_workers': 1})
    reference = take(pipeline.make_train_loader(make_config(corpus), 0, 1), 4)
    it = pipeline.make_train_loader(cfg, 0, 1)
    assert_same_batches(take(it, 2), reference[:2])
    grain.PyGrainCheckpointHandler().save(epath.Path(tmp_path), it)
    it.close()
    resumed = grain.PyGrainCheckpointHandler().restore(epath.Path(tmp_path), pipeline.make_train_loader(cfg, 0, 1))
    assert_same_batches(take(resumed, 2), reference[2:])
    resumed.close()


def test_prepared_tfds_dataset_by_name(tmp_path):
    data_dir = tmp_path / 'tfds'
    digits.prepare(str(data_dir))
    cfg = config_lib.base_config()
    cfg.data.update(name='tfds', tfds_name='mmjax_digits', tfds_caption_key='label', data_dir=str(data_dir))
    cfg.eval.zeroshot = False
    preflight.check(cfg, 8)
    cfg.model.image.image_size = 16
    cfg.train.batch_size = 8
    it = pipeline.make_train_loader(cfg, 0, 1)
    batch = next(it)
    assert batch['image'].shape == (8, 16, 16, 3)
    texts = ByteTokenizer(32).decode(batch['text'])
    assert all(t in {str(d) for d in range(10)} for t in texts), texts  # the 'label' feature as caption
    assert it.stats()['data/bad_samples'] == 0.0


def _problems(cfg):
    with pytest.raises(config_lib.ConfigError) as info:
        preflight.check(cfg, 8)
    return '\n'.join(info.value.problems)


def test_validate_data_section(corpus, tmp_path):
    preflight.check(make_config(corpus), 8)
    assert 'data.spec' in _problems(make_config(corpus, **{'data.spec': str(tmp_path / 'nope.json')}))
    assert 'data.name' in _problems(make_config(corpus, **{'data.name': 'laion'}))
    assert "data.name='spec'" in _problems(make_config(corpus, **{'data.name': 'digits'}))  # spec set, unused
    mix = make_config(corpus, **{'data.name': 'mixture', 'data.spec': '',
                                 'data.mixture': ((str(corpus / 'spec.json'), 0.0),)})
    assert 'data.mixture[0]' in _problems(mix) and 'must be > 0' in _problems(mix)
    mix.data.mixture = ((str(corpus / 'spec.json'), -1.0),)
    assert 'must be > 0' in _problems(mix)
    mix.data.mixture = ((str(corpus / 'spec.json'), 1.0), ('tfds:never_built', 1.0))
    assert 'data.mixture[1]' in _problems(mix) and 'never_built' in _problems(mix)
    missing = make_config(corpus, **{'data.name': 'tfds', 'data.spec': '', 'data.tfds_name': 'x',
                                     'data.data_dir': str(tmp_path / 'absent')})
    assert 'data.data_dir' in _problems(missing)
    deep = make_config(corpus, **{'data.data_dir': str(tmp_path / 'a' / 'b')})
    assert 'data.data_dir' in _problems(deep)
    preflight.check(make_config(corpus, **{'data.data_dir': str(tmp_path / 'fresh')}), 8)  # created later
    small = make_config(corpus, **{'model.text.vocab_size': 200})
    assert 'model.text.vocab_size=200' in _problems(small)
    sp = make_config(corpus, **{'model.text.tokenizer': 'sentencepiece',
                                'model.text.tokenizer_path': str(tmp_path / 'missing.model')})
    assert 'model.text.tokenizer_path' in _problems(sp)


@pytest.mark.slow
def test_train_on_a_caption_corpus_logs_data_metrics(corpus, tmp_path):
    from mmjax.training.loop import train
    from mmjax.training.metrics import read_metrics
    overrides = ['config.data.name=spec', f'config.data.spec={corpus / "spec.json"}',
                 f'config.data.data_dir={corpus / "tfds"}', 'config.train.steps=3', 'config.train.batch_size=8']
    cfg = config_lib.apply_overrides(config_lib.load_config_file('tests/tiny_config.py'),
                                     overrides + ['config.eval.zeroshot=True'])
    with pytest.raises(config_lib.ConfigError, match='eval.zeroshot'):  # no labels: refused before compiling
        train(cfg, str(tmp_path), verbose=False)
    cfg = config_lib.apply_overrides(config_lib.load_config_file('tests/tiny_config.py'), overrides)
    train(cfg, str(tmp_path), verbose=False)
    rows = read_metrics(str(tmp_path))
    assert rows[-1]['data/bad_samples'] == 2.0 and rows[-1]['data/epoch'] == pytest.approx(24 / 60)
    assert not any(k.startswith('zeroshot/') for r in rows for k in r)
