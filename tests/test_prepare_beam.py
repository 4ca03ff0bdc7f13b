"""Preparing a spec on Apache Beam (DirectRunner, 2 worker processes) writes exactly the records and counts the
single-process builder writes; `mmjax prepare` runs both; data on the gs:// emulator; the bad-fraction limit holds."""

import csv
import json
import os

import pytest
from test_builders import encoded, good_samples, write_shard

from mmjax import cli, storage
from mmjax.commands import prepare as prepare_cmd
from mmjax.data import beam_prepare, builders
from mmjax.data.decode import BadDataError

pytest_plugins = ["storage_servers"]

TWO_WORKERS = ('DirectRunner', beam_prepare.pipeline_flags('DirectRunner', num_workers=2))
BAD = [('bad0', {'jpg': b'', 'txt': b'zero bytes'}), ('bad1', {'txt': b'no image'}),
       ('bad2', {'jpg': encoded('JPEG')[:200], 'txt': b'truncated'}), ('bad3', {'png': encoded('PNG'), 'txt': b' '})]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """Three tar shards (bad samples in two, one shard only bad-free) and a CSV with a missing and an empty image;
    each with its spec.json (relative paths)."""
    root = tmp_path_factory.mktemp('corpus')
    write_shard(root / '00000.tar', good_samples('a', 7) + BAD[:2])
    write_shard(root / '00001.tar', good_samples('b', 5))
    write_shard(root / '00002.tar', BAD[2:] + good_samples('c', 9))
    (root / 'wds.json').write_text(json.dumps({'name': 'beam_wds', 'format': 'webdataset', 'limits': {
        'max_bad_fraction': 0.3}, 'splits': {'train': '*.tar', 'test': '00001.tar'}}))
    (root / 'images').mkdir()
    rows = []
    for i in range(8):
        (root / 'images' / f'{i}.jpg').write_bytes(encoded('JPEG', seed=i))
        rows.append({'filepath': f'images/{i}.jpg', 'caption': f'photo {i}'})
    (root / 'images' / 'empty.jpg').write_bytes(b'')
    rows[3:3] = [{'filepath': 'images/gone.jpg', 'caption': 'missing'}, {'filepath': 'images/empty.jpg',
                                                                       'caption': 'empty'}]
    with open(root / 'pairs.csv', 'w', newline='') as handle:
        writer = csv.DictWriter(handle, ['filepath', 'caption'])
        writer.writeheader()
        writer.writerows(rows)
    (root / 'csv.json').write_text(json.dumps({'name': 'beam_csv', 'format': 'csv', 'paths': 'pairs.csv',
                                               'limits': {'max_bad_fraction': 0.3}}))
    return root


def records(name, data_dir, split='train'):
    """Every field of every record, in stored order."""
    source = builders.load_source(name, data_dir, split)
    return [{'key': r['key'], 'index': int(r['index']), 'captions': [bytes(c) for c in r['captions']],
             'image': bytes(r['image'])} for r in (source[i] for i in range(len(source)))]


def stored_stats(name, data_dir):
    return json.loads(storage.read_text(storage.join(builders.dataset_dir(name, data_dir), builders.STATS_FILE)))


def assert_same_dataset(name, one, other, splits=('train',)):
    for split in splits:
        first = records(name, one, split)
        assert [r['index'] for r in first] == list(range(len(first)))  # record i is index i: split order
        assert records(name, other, split) == first
    assert stored_stats(name, other) == stored_stats(name, one)


def test_two_beam_workers_write_the_single_process_records(corpus, tmp_path):
    spec = builders.load_spec_file(str(corpus / 'wds.json'))
    one = builders.prepare_dataset(spec, str(tmp_path / 'one'), progress=False)
    beam = builders.prepare_dataset(spec, str(tmp_path / 'beam'), progress=False,
                                    beam=beam_prepare.BeamPreparation(*TWO_WORKERS))
    assert {s: st.to_dict() for s, st in beam.items()} == {s: st.to_dict() for s, st in one.items()}
    assert (one['train'].seen, one['train'].kept, one['test'].kept) == (25, 21, 5)
    assert dict(one['train'].skipped) == {'empty_image': 1, 'missing_file': 1, 'bad_image': 1, 'empty_caption': 1}
    assert_same_dataset('beam_wds', str(tmp_path / 'one'), str(tmp_path / 'beam'), ('train', 'test'))
    keys = [r['key'].decode() for r in records('beam_wds', str(tmp_path / 'beam'))]
    assert keys == [f'a{i:05d}' for i in range(7)] + [f'b{i:05d}' for i in range(5)] + [f'c{i:05d}' for i in range(9)]
    assert [n for n in os.listdir(tmp_path / 'beam') if 'beam-stats' in n] == []  # the workers' counts, read back


def test_mmjax_prepare_command_on_two_beam_workers_and_in_process(corpus, tmp_path, capsys):
    spec = str(corpus / 'csv.json')
    argv = ['prepare', '--spec', spec, '--data-dir', str(tmp_path / 'beam'), '--quiet']
    assert cli.main([*argv, '--runner', 'DirectRunner', '--num-workers', '2']) == 0
    assert 'prepared beam_csv/train: seen=10 kept=8 skipped: empty_image=1, missing_file=1' in capsys.readouterr().out
    assert cli.main(['prepare', '--spec', spec, '--data-dir', str(tmp_path / 'one'), '--quiet']) == 0
    assert_same_dataset('beam_csv', str(tmp_path / 'one'), str(tmp_path / 'beam'))
    assert [r['captions'] for r in records('beam_csv', str(tmp_path / 'one'))] == [
        [f'photo {i}'.encode()] for i in range(8)]


def test_mmjax_prepare_refuses_what_cannot_work_in_one_line(corpus, capsys):
    spec = str(corpus / 'csv.json')
    cases = [(['--num-workers', '2'], '--num-workers configure a Beam runner: add --runner'),
             (['--runner', 'DirectRunner', '--num-workers', '0'], '--num-workers 0: give at least 1'),
             (['--runner', 'DataflowRunner', '--project', 'p'], 'needs --region, --temp-location'),
             (['--runner', 'DataflowRunner', '--project', 'p', '--region', 'r', '--temp-location', '/tmp/x'],
              'Dataflow needs a gs:// folder'),
             (['--data-dir', 's3://bucket/tfds'], 'local disk or gs:// only, not s3://'),
             (['--spec', 'tfds:coco_captions'], 'give a builder spec')]
    for extra, message in cases:
        assert cli.main(['prepare', '--spec', spec, '--data-dir', '/tmp/unused', *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith('mmjax: error: ') and message in err and '\n' not in err, err


def test_dataflow_flags_become_beam_pipeline_options(corpus):
    args, _ = cli.parse_command([
        'prepare', '--spec', 'gs://b/spec.json', '--data-dir', 'gs://b/tfds', '--runner', 'DataflowRunner',
        '--project', 'p', '--region', 'us-central1', '--temp-location', 'gs://b/tmp', '--num-workers', '8',
        '--max-num-workers', '32', '--machine-type', 'n2-standard-8', '--setup-file', './setup.py',
        '--beam-option=--sdk_container_image=img'])
    preparation = prepare_cmd.beam_preparation(args)
    assert preparation.runner == 'DataflowRunner' and preparation.flags == [
        '--runner=DataflowRunner', '--project=p', '--region=us-central1', '--temp_location=gs://b/tmp',
        '--num_workers=8', '--max_num_workers=32', '--machine_type=n2-standard-8', '--setup_file=./setup.py',
        '--sdk_container_image=img']
    local = builders.normalize_spec(builders.load_spec_file(str(corpus / 'csv.json')))
    with pytest.raises(beam_prepare.BeamSetupError, match=r'must be gs:// URLs \(local: .*pairs.csv\)'):
        preparation.check_paths(local, 'gs://b/tfds')


def test_bad_fraction_limit_holds_under_beam(corpus, tmp_path):
    shard = tmp_path / 'mostly_bad.tar'
    write_shard(shard, good_samples('g', 2) + [(f'z{i}', {'jpg': b'garbage', 'txt': b'c'}) for i in range(8)])
    spec = {'name': 'beam_bad', 'format': 'webdataset', 'paths': [str(corpus / '00001.tar'), str(shard)]}
    with pytest.raises(BadDataError) as single:
        builders.prepare_dataset(spec, str(tmp_path / 'one'), progress=False)
    in_process = beam_prepare.BeamPreparation('DirectRunner', beam_prepare.pipeline_flags('DirectRunner'))
    with pytest.raises(BadDataError) as beam:
        builders.prepare_dataset(spec, str(tmp_path / 'beam'), progress=False, beam=in_process)
    assert str(beam.value) == str(single.value) and 'mostly_bad.tar: 2 bad samples in the first' in str(beam.value)
    assert not builders.is_prepared('beam_bad', str(tmp_path / 'beam'))


@pytest.mark.slow
def test_bad_fraction_error_comes_back_from_worker_processes(corpus, tmp_path):
    shard = tmp_path / 'mostly_bad.tar'
    write_shard(shard, [(f'z{i}', {'jpg': b'garbage', 'txt': b'c'}) for i in range(8)] + good_samples('g', 2))
    spec = {'name': 'beam_bad', 'format': 'webdataset', 'paths': [str(corpus / '00001.tar'), str(shard)]}
    with pytest.raises(BadDataError, match=r'^webdataset file .*mostly_bad.tar: 2 bad samples in the first 2 of '
                                           r"its 10, over max_bad_fraction=10.0% .*max_bad_fraction$"):
        builders.prepare_dataset(spec, str(tmp_path / 'beam'), progress=False,
                                 beam=beam_prepare.BeamPreparation(*TWO_WORKERS))
    assert not builders.is_prepared('beam_bad', str(tmp_path / 'beam'))


def upload(local, url):
    for path in sorted(local.rglob('*')):
        if path.is_file():
            storage.write_bytes_atomic(storage.join(url, str(path.relative_to(local))), path.read_bytes())


def test_spec_shards_and_data_dir_on_a_bucket(corpus, tmp_path, gs_bucket, gs_server, monkeypatch):
    # array_record's own GCS client (it reads the prepared shards) finds the emulator through this variable.
    monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', gs_server.endpoint)
    monkeypatch.chdir(tmp_path)
    upload(corpus, f'{gs_bucket}/corpus')
    for name, spec in (('beam_wds', 'wds.json'), ('beam_csv', 'csv.json')):
        assert cli.main(['prepare', '--spec', f'{gs_bucket}/corpus/{spec}', '--data-dir', f'{gs_bucket}/tfds',
                         '--quiet']) == 0
        builders.prepare_dataset(builders.load_spec_file(str(corpus / spec)), str(tmp_path / 'local'),
                                 progress=False)
        assert records(name, f'{gs_bucket}/tfds') == records(name, str(tmp_path / 'local'))
        assert stored_stats(name, f'{gs_bucket}/tfds')['splits'] == stored_stats(name, str(tmp_path / 'local'))[
            'splits']
    assert builders.load_stats('beam_csv', f'{gs_bucket}/tfds')['train'].kept == 8
    assert not [p for p in tmp_path.rglob('gs:*')] and not os.path.exists('gs:')


@pytest.mark.slow
def test_beam_workers_read_and_write_a_bucket(corpus, tmp_path, gs_bucket, gs_server, monkeypatch):
    monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', gs_server.endpoint)  # the worker processes inherit it
    monkeypatch.chdir(tmp_path)
    upload(corpus, f'{gs_bucket}/corpus')
    builders.prepare_dataset(builders.load_spec_file(f'{gs_bucket}/corpus/wds.json'), f'{gs_bucket}/tfds',
                             progress=False, beam=beam_prepare.BeamPreparation(*TWO_WORKERS))
    builders.prepare_dataset(builders.load_spec_file(str(corpus / 'wds.json')), str(tmp_path / 'local'),
                             progress=False)
    for split in ('train', 'test'):
        assert records('beam_wds', f'{gs_bucket}/tfds', split) == records('beam_wds', str(tmp_path / 'local'), split)
    assert stored_stats('beam_wds', f'{gs_bucket}/tfds')['splits'] == stored_stats('beam_wds', str(
        tmp_path / 'local'))['splits']
    assert storage.listdir(f'{gs_bucket}/tfds') == ['beam_wds']  # no counts left behind by the workers
    assert not [p for p in tmp_path.rglob('gs:*')] and not os.path.exists('gs:')
