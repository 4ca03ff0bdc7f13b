"""Data: tokenizer, image preprocessing, the digits dataset and the grain pipeline (sharding, resume, seeds)."""

import re

import grain.python as grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import digits, pipeline
from mmjax.data.image import preprocess_images, random_affine
from mmjax.data.tokenizers import ByteTokenizer, get_tokenizer

NUM_TRAIN = 1437  # 1,797 digits minus the 360 with index % 5 == 0
NUM_TEST = 360


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """The config keys the data package reads; `overrides` like {'train.batch_size': 8}."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name='digits', data_dir=str(data_dir), num_workers=0, augment=True,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)))
    c.model = ml_collections.ConfigDict(dict(
        image=dict(image_size=32, channels=3),
        text=dict(vocab_size=259, max_len=32, tokenizer='bytes')))
    c.train = ml_collections.ConfigDict(dict(batch_size=16))
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('tfds')
    digits.prepare(str(path))
    return path


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- tokenizer ---------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(max_len=32)
    texts = ['handwritten 7', 'a photo of the number seven.', 'héllo ✓', '']
    tokens = tok.encode(texts)
    assert tokens.shape == (4, 32) and tokens.dtype == np.int32
    assert tok.decode(tokens) == texts
    assert tok.vocab_size == 259 and tok.pad_id == 0
    np.testing.assert_array_equal(tokens[0, 1:4], np.frombuffer(b'han', np.uint8) + 3)


def test_byte_tokenizer_bos_eot_and_truncation():
    tok = ByteTokenizer(max_len=8)
    tokens = tok.encode(['ab', 'a much longer caption'])
    np.testing.assert_array_equal(tokens[0], [1, ord('a') + 3, ord('b') + 3, 2, 0, 0, 0, 0])
    assert tokens[1, 0] == 1 and tokens[1, -1] == 2 and (tokens[1] != 0).all()
    assert tok.decode(tokens[1:]) == ['a much']  # max_len - 2 content bytes survive


def test_get_tokenizer_checks_config():
    cfg = ml_collections.ConfigDict(dict(vocab_size=259, max_len=16, tokenizer='bytes'))
    tok = get_tokenizer(cfg)
    assert isinstance(tok, ByteTokenizer) and tok.max_len == 16
    with pytest.raises(ValueError, match='vocab_size'):
        get_tokenizer(ml_collections.ConfigDict(dict(vocab_size=100, max_len=16, tokenizer='bytes')))
    with pytest.raises(ValueError, match='tokenizer'):
        get_tokenizer(ml_collections.ConfigDict(dict(vocab_size=259, max_len=16, tokenizer='nope')))


# --- images ------------------------------------------------------------------------------------------


def test_preprocess_gray_to_rgb_range():
    images = np.zeros((2, 32, 32), np.uint8)
    images[1] = 255
    out = preprocess_images(images, 32, 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)


def test_preprocess_rgb_to_gray_and_resize_odd_sizes():
    red = np.zeros((3, 17, 23, 3), np.uint8)
    red[..., 0] = 255
    out = preprocess_images(red, 8, 1, mean=0.0, std=1.0)
    assert out.shape == (3, 8, 8, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.299, atol=1e-5)
    mixed = [np.full((5, 7), 128, np.uint8), Image.new('RGB', (40, 30), (0, 0, 255)),
             np.full((9, 9, 4), 255, np.uint8)]
    out = preprocess_images(mixed, 32, 3, mean=0.0, std=1.0)
    assert out.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(out[0], 128 / 255, atol=1e-4)
    np.testing.assert_allclose(out[1], np.broadcast_to([0, 0, 1], (32, 32, 3)), atol=1e-4)
    np.testing.assert_allclose(out[2], 1.0, atol=1e-4)
    with pytest.raises(ValueError, match='image_mean'):
        preprocess_images(red, 8, 3, mean=(0.5, 0.5), std=1.0)


def test_random_affine_identity_and_determinism():
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    same = random_affine(image, np.random.default_rng(1), max_translate=0.0, scale_range=(1.0, 1.0))
    np.testing.assert_array_equal(same, image)
    a = random_affine(image, np.random.default_rng(3))
    b = random_affine(image, np.random.default_rng(3))
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image)


# --- dataset -----------------------------------------------------------------------------------------


def test_digits_splits(data_dir):
    from sklearn.datasets import load_digits
    targets = load_digits().target
    decode = pipeline.DecodeExample()
    for split, size, held_out in [('train', NUM_TRAIN, False), ('test', NUM_TEST, True)]:
        source = digits.data_source(str(data_dir), split)
        assert len(source) == size
        records = [decode.map(source[i]) for i in range(size)]
        indices = np.array([r['index'] for r in records])
        assert len(set(indices.tolist())) == size
        assert ((indices % 5 == 0) == held_out).all()
        np.testing.assert_array_equal([r['label'] for r in records], targets[indices])
        assert records[0]['image'].shape == (32, 32, 1) and records[0]['image'].dtype == np.uint8
    assert decode.map(source[0])['image'].max() > 200  # ink is bright after upsampling


def test_prepare_reuses_existing_build(data_dir, capsys):
    assert digits.prepare(str(data_dir)) == str(data_dir)
    assert 'building' not in capsys.readouterr().err


def test_load_eval_split_and_prompts(data_dir):
    cfg = make_config(data_dir)
    ev = pipeline.load_eval_split(cfg, 'test')
    assert ev['image'].shape == (NUM_TEST, 32, 32, 3) and ev['image'].dtype == np.float32
    assert ev['label'].dtype == np.int32
    assert -1.0 <= ev['image'].min() and ev['image'].max() <= 1.0
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(ev['label'], load_digits().target[::5])
    names, templates = pipeline.zeroshot_prompts(cfg)
    assert names[7] == 'seven' and len(names) == 10
    training_with_words = {t.format(word='{}') for t in digits.CAPTION_TEMPLATES if '{digit}' not in t}
    assert set(templates) & training_with_words  # overlap with training captions ...
    assert set(templates) - training_with_words  # ... but not identical


# --- pipeline ----------------------------------------------------------------------------------------


def caption_number(text: str) -> int:
    words = '|'.join(digits.CLASS_NAMES)
    found = re.findall(rf'\b({words}|\d)\b', text)
    assert len(found) == 1, text
    return int(found[0]) if found[0].isdigit() else digits.CLASS_NAMES.index(found[0])


def test_batches_shapes_and_captions_match_labels(data_dir):
    cfg = make_config(data_dir)
    tok = get_tokenizer(cfg.model.text)
    texts = set()
    for batch in take(pipeline.make_train_loader(cfg, 0, 1), 4):
        assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
        assert batch['text'].shape == (16, 32) and batch['text'].dtype == np.int32
        assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
        assert (batch['text'][:, 0] == 1).all()
        assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
        for text, label in zip(tok.decode(batch['text']), batch['label']):
            assert caption_number(text) == label
            texts.add(text)
    assert len(texts) > 20  # captions vary


def test_processes_see_disjoint_shards_covering_the_epoch(data_dir):
    cfg = make_config(data_dir)
    source = pipeline.make_source(cfg, 'train')
    per_process = NUM_TRAIN // 2
    seen = []
    for process_index in (0, 1):
        loader = grain.DataLoader(
            data_source=source, sampler=pipeline.make_sampler(cfg, len(source), process_index, 2),
            operations=[pipeline.DecodeExample()], read_options=pipeline.READ_OPTIONS)
        it = iter(loader)
        first_epoch = [int(next(it)['index']) for _ in range(per_process)]
        second_epoch = [int(next(it)['index']) for _ in range(per_process)]
        assert len(set(first_epoch)) == per_process
        assert set(second_epoch) == set(first_epoch) and second_epoch != first_epoch  # reshuffled
        seen.append(set(first_epoch))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 2 * per_process  # everything but the dropped remainder
    assert all(i % 5 for i in seen[0] | seen[1])
    b0 = next(pipeline.make_train_loader(cfg, 0, 2))
    b1 = next(pipeline.make_train_loader(cfg, 1, 2))
    assert b0['image'].shape[0] == b1['image'].shape[0] == 8
    assert not np.array_equal(b0['image'], b1['image'])


def test_resume_from_iterator_state_continues_identically(data_dir):
    cfg = make_config(data_dir)
    reference = take(pipeline.make_train_loader(cfg, 0, 1), 7)
    it = pipeline.make_train_loader(cfg, 0, 1)
    take(it, 4)
    state = it.get_state()
    resumed = pipeline.make_train_loader(cfg, 0, 1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), reference[4:])


def test_resume_crosses_epoch_boundary(data_dir):
    cfg = make_config(data_dir, **{'train.batch_size': 256})
    it = pipeline.make_train_loader(cfg, 0, 1)
    take(it, 5)  # 1,280 of 1,437 examples
    state = it.get_state()
    expected = take(it, 2)  # spans the end of epoch 1
    resumed = pipeline.make_train_loader(cfg, 0, 1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), expected)


def test_seed_determines_stream(data_dir):
    a = take(pipeline.make_train_loader(make_config(data_dir), 0, 1), 2)
    b = take(pipeline.make_train_loader(make_config(data_dir), 0, 1), 2)
    c = take(pipeline.make_train_loader(make_config(data_dir, seed=1), 0, 1), 2)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]['label'], c[0]['label'])
    assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_worker_processes_give_the_same_stream(data_dir):
    reference = take(pipeline.make_train_loader(make_config(data_dir), 0, 1), 3)
    it = pipeline.make_train_loader(make_config(data_dir, **{'data.num_workers': 1}), 0, 1)
    assert_same_batches(take(it, 3), reference)


def test_config_errors(data_dir):
    with pytest.raises(ValueError, match='batch_size'):
        pipeline.make_train_loader(make_config(data_dir, **{'train.batch_size': 15}), 0, 2)
    with pytest.raises(ValueError, match='data.name'):
        pipeline.make_train_loader(make_config(data_dir, **{'data.name': 'mnist'}), 0, 1)
    with pytest.raises(ValueError, match='image_mean'):
        pipeline.make_train_loader(make_config(data_dir, **{'data.image_mean': (0.5, 0.5)}), 0, 1)
    with pytest.raises(ValueError, match='process_index'):
        pipeline.make_train_loader(make_config(data_dir), 2, 2)
