"""TFDS builders from real small files: webdataset tars, CSV/TSV, COCO JSON; bad samples skipped and counted."""

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmjax.data import builders
from mmjax.data.decode import BadDataError, decode_image

RNG = np.random.default_rng(0)


def encoded(fmt: str, size=(40, 30), mode='RGB', seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(side=5000) -> bytes:
    """A valid PNG header claiming side x side pixels (a tiny file; far more pixels than the test limit)."""
    image = Image.new('1', (side, side))
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, 'w') as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                add(tar, f'{key}.{ext}', data)


def good_samples(prefix, n, fmt_cycle=('jpg', 'png', 'webp')):
    names = {'jpg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}
    out = []
    for i in range(n):
        ext = fmt_cycle[i % len(fmt_cycle)]
        parts = {ext: encoded(names[ext], seed=i), 'txt': f'{prefix} caption number {i}'.encode()}
        if i % 2:
            parts['json'] = json.dumps({'url': f'http://x/{i}', 'caption': 'ignored'}).encode()
        out.append((f'{prefix}{i:05d}', parts))
    return out


def test_webdataset_builds_reads_back_and_counts_bad(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    write_shard(src / '00000.tar', good_samples('a', 12))
    bad = [
        ('bad0', {'jpg': b'', 'txt': b'zero bytes'}),
        ('bad1', {'jpg': encoded('JPEG')[:200], 'txt': b'truncated'}),
        ('bad2', {'png': bomb_png(), 'txt': b'bomb'}),
        ('bad3', {'jpg': encoded('JPEG'), 'txt': b'   '}),
        ('bad4', {'jpg': encoded('JPEG'), 'txt': b'\xff\xfe not utf8'}),
        ('bad5', {'jpg': encoded('JPEG'), 'txt': b'x' * 5000}),
        ('bad6', {'txt': b'no image at all'}),
        ('bad7', {'webp': b'RIFF\x00\x00\x00\x00WEBPjunk', 'txt': b'corrupt'}),
    ]
    write_shard(src / '00001.tar', good_samples('b', 12) + bad)
    spec = {'name': 'wds_test', 'format': 'webdataset',
            'splits': {'train': str(src / '*.tar'), 'test': str(src / '00000.tar')},
            'limits': {'max_pixels': 10_000_000, 'max_caption_chars': 1000, 'max_bad_fraction': 0.5}}
    stats = builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)
    train = stats['train']
    assert train.kept == 24 and train.seen == 32
    assert dict(train.skipped) == {'empty_image': 1, 'bad_image': 2, 'too_many_pixels': 1, 'empty_caption': 1,
                                   'bad_caption': 1, 'long_caption': 1, 'missing_file': 1}
    assert stats['test'].kept == 12 and stats['test'].num_bad == 0
    assert train.metrics()['data/skipped_bad_image'] == 2.0

    source = builders.load_source('wds_test', str(tmp_path / 'tfds'), 'train')
    assert len(source) == 24
    records = [source[i] for i in range(len(source))]
    keys = sorted(r['key'].decode() for r in records)
    assert keys == sorted([f'a{i:05d}' for i in range(12)] + [f'b{i:05d}' for i in range(12)])
    assert sorted(int(r['index']) for r in records) == list(range(24))
    for record in records:
        captions = builders.record_captions(record)
        key = record['key'].decode()
        assert captions == [f'{key[0]} caption number {int(key[1:])}']
        image = decode_image(record['image'])
        assert image.shape == (30, 40, 3) and image.dtype == np.uint8

    # Reuse: a second call does not rebuild and returns the saved stats; a changed spec is refused.
    mtime = os.path.getmtime(os.path.join(builders.dataset_dir('wds_test', str(tmp_path / 'tfds')),
                                          'dataset_info.json'))
    again = builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)
    assert again['train'].to_dict() == train.to_dict()
    assert os.path.getmtime(os.path.join(builders.dataset_dir('wds_test', str(tmp_path / 'tfds')),
                                         'dataset_info.json')) == mtime
    with pytest.raises(ValueError, match='different spec'):
        builders.prepare_dataset({**spec, 'limits': {'max_bad_fraction': 0.9}}, str(tmp_path / 'tfds'),
                                 progress=False)


def test_too_many_bad_and_unreadable_shard_name_the_file(tmp_path):
    shard = tmp_path / 'mostly_bad.tar'
    write_shard(shard, good_samples('g', 2) + [(f'z{i}', {'jpg': b'garbage', 'txt': b'c'}) for i in range(8)])
    spec = {'name': 'bad_frac', 'format': 'webdataset', 'paths': str(shard)}
    with pytest.raises(BadDataError, match='mostly_bad.tar'):
        builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)

    truncated = tmp_path / 'truncated.tar'
    write_shard(truncated, good_samples('t', 6))
    truncated.write_bytes(truncated.read_bytes()[:5000])  # cut inside a member
    with pytest.raises(BadDataError, match='truncated.tar is unreadable'):
        builders.prepare_dataset({'name': 'truncated', 'format': 'webdataset', 'paths': str(truncated)},
                                 str(tmp_path / 'tfds'), progress=False)
    assert not builders.is_prepared('truncated', str(tmp_path / 'tfds'))

    broken = tmp_path / 'broken.tar'
    broken.write_bytes(b'this is not a tar file at all' * 100)
    with pytest.raises(BadDataError, match='broken.tar'):
        builders.prepare_dataset({'name': 'broken', 'format': 'webdataset', 'paths': str(broken)},
                                 str(tmp_path / 'tfds'), progress=False)


@pytest.mark.parametrize('delimiter,suffix', [(',', '.csv'), ('\t', '.tsv')])
def test_csv_relative_paths_and_missing_files(tmp_path, monkeypatch, delimiter, suffix):
    images = tmp_path / 'data' / 'images'
    images.mkdir(parents=True)
    rows = []
    for i in range(10):
        name = f'img{i}.{"png" if i % 2 else "jpg"}'
        (images / name).write_bytes(encoded('PNG' if i % 2 else 'JPEG', seed=i))
        rows.append({'path': f'images/{name}', 'text': f'photo {i}', 'alt': f'alt {i}'})
    rows.append({'path': 'images/does_not_exist.jpg', 'text': 'missing', 'alt': 'm'})
    (images / 'empty.jpg').write_bytes(b'')
    rows.append({'path': 'images/empty.jpg', 'text': 'empty file', 'alt': 'e'})
    rows.append({'path': str(images / 'img0.jpg'), 'text': 'absolute path', 'alt': ''})
    table = tmp_path / 'data' / f'pairs{suffix}'
    with open(table, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, ['path', 'text', 'alt'], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    spec = {'name': 'csv_test', 'format': 'csv', 'paths': [str(table)], 'image_column': 'path',
            'caption_column': ['text', 'alt'], 'limits': {'max_bad_fraction': 0.5}}
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the CSV, not the working directory
    stats = builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)['train']
    assert (stats.kept, dict(stats.skipped)) == (11, {'missing_file': 1, 'empty_image': 1})
    source = builders.load_source('csv_test', str(tmp_path / 'tfds'))
    by_key = {r['key'].decode(): r for r in (source[i] for i in range(len(source)))}
    assert builders.record_captions(by_key['3']) == ['photo 3', 'alt 3']
    assert builders.record_captions(by_key['12']) == ['absolute path']  # the blank alt caption is dropped
    assert decode_image(by_key['3']['image']).shape == (30, 40, 3)

    with pytest.raises(BadDataError, match='lacks columns'):
        builders.prepare_dataset({**spec, 'name': 'csv_cols', 'image_column': 'nope'}, str(tmp_path / 'tfds'),
                                 progress=False)


def test_coco_captions_kept_as_list(tmp_path):
    (tmp_path / 'val').mkdir()
    images, annotations = [], []
    for i in range(6):
        (tmp_path / 'val' / f'{i:012d}.jpg').write_bytes(encoded('JPEG', seed=i, mode='L' if i == 2 else 'RGB'))
        images.append({'id': 100 + i, 'file_name': f'{i:012d}.jpg', 'width': 40, 'height': 30})
        annotations += [{'id': 10 * i + k, 'image_id': 100 + i, 'caption': f'image {i} caption {k}'}
                        for k in range(3 + i % 3)]
    images.append({'id': 999, 'file_name': 'gone.jpg'})
    (tmp_path / 'ann').mkdir()
    ann = tmp_path / 'ann' / 'captions_val.json'
    ann.write_text(json.dumps({'images': images, 'annotations': annotations}))
    spec = {'name': 'coco_test', 'format': 'coco', 'splits': {'validation': str(ann)},
            'image_root': str(tmp_path / 'val'), 'limits': {'max_bad_fraction': 0.2}}
    stats = builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)['validation']
    assert (stats.kept, dict(stats.skipped)) == (6, {'missing_file': 1})
    source = builders.load_source('coco_test', str(tmp_path / 'tfds'), 'validation')
    for record in (source[i] for i in range(len(source))):
        i = int(record['key']) - 100
        assert builders.record_captions(record) == [f'image {i} caption {k}' for k in range(3 + i % 3)]
        assert decode_image(record['image']).shape == (30, 40, 3)  # the gray JPEG comes back RGB
    with pytest.raises(ValueError, match='no split'):
        builders.load_source('coco_test', str(tmp_path / 'tfds'), 'train')
    with pytest.raises(FileNotFoundError, match='prepare_dataset'):
        builders.load_source('never_built', str(tmp_path / 'tfds'))


def test_spec_validation(tmp_path):
    with pytest.raises(ValueError, match='format'):
        builders.normalize_spec({'name': 'x', 'format': 'parquet', 'paths': 'a'})
    with pytest.raises(ValueError, match='lower_snake_case'):
        builders.normalize_spec({'name': 'Bad-Name', 'format': 'csv', 'paths': 'a'})
    with pytest.raises(FileNotFoundError, match='no file matches'):
        builders.normalize_spec({'name': 'x', 'format': 'csv', 'paths': str(tmp_path / '*.csv')})
    (tmp_path / 'a.csv').write_text('filepath,caption\n')
    with pytest.raises(ValueError, match='unknown keys'):
        builders.normalize_spec({'name': 'x', 'format': 'csv', 'paths': str(tmp_path / 'a.csv'), 'colour': 1})
    with pytest.raises(ValueError, match='unknown decode limits'):
        builders.normalize_spec({'name': 'x', 'format': 'csv', 'paths': str(tmp_path / 'a.csv'),
                                 'limits': {'max_pix': 1}})


def test_prepared_records_through_grain_transform(tmp_path):
    import pickle

    import grain.python as grain

    from mmjax.data.decode import DecodeCropTokenize
    from mmjax.data.tokenizers import ByteTokenizer

    write_shard(tmp_path / 's.tar', good_samples('c', 8))
    builders.prepare_dataset({'name': 'grain_test', 'format': 'webdataset', 'paths': str(tmp_path / 's.tar')},
                             str(tmp_path / 'tfds'), progress=False)
    source = builders.load_source('grain_test', str(tmp_path / 'tfds'))
    tok = ByteTokenizer(24)
    transform = DecodeCropTokenize(tokenizer=tok, size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    transform = pickle.loads(pickle.dumps(transform))  # grain worker processes receive it pickled
    batches = list(grain.MapDataset.source(source).random_map(transform, seed=3).batch(4))
    assert len(batches) == 2
    for batch in batches:
        assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.float32
        assert batch['text'].shape == (4, 24) and (batch['label'] == -1).all()
        assert -2.0 - 1e-6 <= batch['image'].min() and batch['image'].max() <= 2.0 + 1e-6
    texts = tok.decode(np.concatenate([b['text'] for b in batches]))
    assert sorted(texts) == sorted(f'c caption number {i}' for i in range(8))
    again = list(grain.MapDataset.source(source).random_map(transform, seed=3).batch(4))
    np.testing.assert_array_equal(again[0]['image'], batches[0]['image'])  # deterministic per seed
    evaluation = DecodeCropTokenize(tokenizer=tok, size=16, mean=(0.5,) * 3, std=(0.5,) * 3, train=False)
    first = evaluation.random_map(source[0], np.random.default_rng(0))
    np.testing.assert_array_equal(first['image'],
                                  evaluation.random_map(source[0], np.random.default_rng(9))['image'])
    gray = DecodeCropTokenize(tokenizer=tok, size=16, mean=(0.5,), std=(0.5,), channels=1)
    assert gray.random_map(source[0], np.random.default_rng(0))['image'].shape == (16, 16, 1)


def test_spec_file_paths_relative_to_the_file(tmp_path):
    (tmp_path / 'specs').mkdir()
    write_shard(tmp_path / 'specs' / 'x.tar', good_samples('x', 3))
    (tmp_path / 'specs' / 'pairs.json').write_text(json.dumps(
        {'name': 'from_file', 'format': 'webdataset', 'paths': '*.tar'}))
    spec = builders.load_spec_file(str(tmp_path / 'specs' / 'pairs.json'))
    assert builders.normalize_spec(spec)['splits'] == {'train': [str(tmp_path / 'specs' / 'x.tar')]}
    assert builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)['train'].kept == 3
