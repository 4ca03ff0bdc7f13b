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


def concat_batches(parts):
    """[process][batch] host batches -> [batch] global batches (processes concatenated in order)."""
    return [{k: np.concatenate([p[g][k] for p in parts]) for k in parts[0][g]} for g in range(len(parts[0]))]


def test_process_batches_concatenate_to_the_global_batch(data_dir):
    cfg = make_config(data_dir)
    reference = take(pipeline.make_train_loader(cfg, 0, 1), 3)
    for n in (2, 4):
        parts = [take(pipeline.make_train_loader(cfg, p, n), 3) for p in range(n)]
        assert all(b['image'].shape[0] == 16 // n for part in parts for b in part)
        assert_same_batches(concat_batches(parts), reference)  # images, texts, labels, example for example
        assert not np.array_equal(parts[0][0]['image'], parts[1][0]['image'])


def test_host_batches_hold_this_process_positions_of_the_global_stream(data_dir):
    cfg = make_config(data_dir)
    records = pipeline.shuffled_records(pipeline.make_source(cfg, 'train'), cfg.seed)
    labels = np.array([records[k]['label'] for k in range(3 * 16)], np.int32)
    for p in range(2):  # process p reads positions [g*16 + 8p, g*16 + 8p + 8) of global batch g
        it = pipeline.make_train_loader(cfg, p, 2)
        for g in range(3):
            np.testing.assert_array_equal(next(it)['label'], labels[g * 16 + 8 * p: g * 16 + 8 * p + 8])


def test_epochs_cover_the_split_and_reshuffle(data_dir):
    cfg = make_config(data_dir)
    source = pipeline.make_source(cfg, 'train')
    records = pipeline.shuffled_records(source, cfg.seed)
    epochs = [[int(records[e * NUM_TRAIN + i]['index']) for i in range(NUM_TRAIN)] for e in range(2)]
    all_indices = {int(source[i]['index']) for i in range(NUM_TRAIN)}
    assert set(epochs[0]) == set(epochs[1]) == all_indices and len(epochs[0]) == NUM_TRAIN
    assert epochs[0] != epochs[1]  # every epoch is a new permutation
    other = pipeline.shuffled_records(source, cfg.seed + 1)
    other_first = [int(other[i]['index']) for i in range(NUM_TRAIN)]
    assert other_first not in epochs  # seed s + 1 is not seed s one epoch later
    it = pipeline.make_train_loader(cfg, 0, 1)
    assert it.get_state() == {'examples_seen': 0, 'epoch': 0}
    it.set_state({'examples_seen': 2 * NUM_TRAIN - 8, 'epoch': 1})
    next(it)
    assert it.get_state() == {'examples_seen': 2 * NUM_TRAIN + 8, 'epoch': 2}


def test_resume_from_iterator_state_continues_identically(data_dir):
    cfg = make_config(data_dir)
    reference = take(pipeline.make_train_loader(cfg, 0, 1), 7)
    it = pipeline.make_train_loader(cfg, 0, 1)
    take(it, 4)
    state = it.get_state()
    resumed = pipeline.make_train_loader(cfg, 0, 1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), reference[4:])


def test_resume_on_another_process_count(data_dir):
    cfg = make_config(data_dir)
    reference = take(pipeline.make_train_loader(cfg, 0, 1), 5)
    its = [pipeline.make_train_loader(cfg, p, 2) for p in range(2)]
    for it in its:
        take(it, 2)
    states = [it.get_state() for it in its]
    assert states[0] == states[1]  # one state, whatever the process
    one = pipeline.make_train_loader(cfg, 0, 1)
    one.set_state(states[0])
    assert_same_batches(take(one, 2), reference[2:4])
    quarters = [pipeline.make_train_loader(cfg, p, 4) for p in range(4)]
    for q in quarters:
        q.set_state(one.get_state())
    assert_same_batches(concat_batches([take(q, 1) for q in quarters]), reference[4:])


def test_resume_crosses_epoch_boundary(data_dir):
    cfg = make_config(data_dir, **{'train.batch_size': 32})
    it = pipeline.make_train_loader(cfg, 0, 1)
    it.set_state({'examples_seen': NUM_TRAIN - 72, 'epoch': 0})
    take(it, 2)  # up to 8 examples before the end of epoch 0
    state = it.get_state()
    expected = take(it, 2)  # spans the end of epoch 0
    resumed = pipeline.make_train_loader(cfg, 0, 1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), expected)


def test_checkpoint_round_trip_with_worker_across_epoch_boundary(data_dir, tmp_path):
    """Through grain's checkpoint handler (what PyGrainCheckpointSave/Restore call), with a worker process."""
    from etils import epath
    cfg = make_config(data_dir, **{'train.batch_size': 32, 'data.num_workers': 1})
    near_the_end = {'examples_seen': NUM_TRAIN - 40, 'epoch': 0}
    reference = pipeline.make_train_loader(make_config(data_dir, **{'train.batch_size': 32}), 0, 1)
    reference.set_state(near_the_end)
    reference = take(reference, 3)
    handler = grain.PyGrainCheckpointHandler()
    it = pipeline.make_train_loader(cfg, 0, 1)
    it.set_state(near_the_end)
    assert_same_batches(take(it, 1), reference[:1])
    handler.save(epath.Path(tmp_path), it)
    it.close()
    resumed = handler.restore(epath.Path(tmp_path), pipeline.make_train_loader(cfg, 0, 1))
    assert resumed.get_state() == {'examples_seen': NUM_TRAIN - 8, 'epoch': 0}
    assert_same_batches(take(resumed, 2), reference[1:])  # the first spans the end of epoch 0
    resumed.close()


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
    it.close()


def test_config_errors(data_dir):
    with pytest.raises(ValueError, match='batch_size'):
        pipeline.make_train_loader(make_config(data_dir, **{'train.batch_size': 15}), 0, 2)
    with pytest.raises(ValueError, match='data.name'):
        pipeline.make_train_loader(make_config(data_dir, **{'data.name': 'mnist'}), 0, 1)
    with pytest.raises(ValueError, match='image_mean'):
        pipeline.make_train_loader(make_config(data_dir, **{'data.image_mean': (0.5, 0.5)}), 0, 1)
    with pytest.raises(ValueError, match='process_index'):
        pipeline.make_train_loader(make_config(data_dir), 2, 2)
    with pytest.raises(ValueError, match='seed'):
        pipeline.make_train_loader(make_config(data_dir, seed=-1), 0, 1)
