"""Data-path faults (issue 22): over-long CSV fields, the per-file bad-sample limit, torn metrics.jsonl lines."""

import csv
import io
import json
import os
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmjax.commands.eval import read_eval_results
from mmjax.data import builders
from mmjax.data.decode import BadDataError, BadSample
from mmjax.eval import plots
from mmjax.training.metrics import MetricsWriter, read_metrics


def _png(seed: int = 0, side: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    return buffer.getvalue()


def _write_csv(path, rows):
    with open(path, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.DictWriter(handle, ['filepath', 'caption'])
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------- over-long CSV fields

def test_csv_caption_over_the_csv_field_limit_is_counted_as_long_caption(tmp_path):
    (tmp_path / 'good.png').write_bytes(_png())
    rows = [{'filepath': 'good.png', 'caption': f'photo {i}'} for i in range(8)]
    rows.insert(3, {'filepath': 'good.png', 'caption': 'x' * 200_000})  # over Python's 131,072-byte field limit
    rows.insert(6, {'filepath': 'good.png', 'caption': 'scraped page\n' * 12_000})  # long, and quoted over lines
    _write_csv(tmp_path / 'pairs.csv', rows)
    spec = {'name': 'long_csv', 'format': 'csv', 'paths': str(tmp_path / 'pairs.csv'),
            'limits': {'max_bad_fraction': 0.5}}
    stats = builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)['train']
    assert (stats.seen, stats.kept, dict(stats.skipped)) == (10, 8, {'long_caption': 2})
    source = builders.load_source('long_csv', str(tmp_path / 'tfds'))
    captions = sorted(builders.record_captions(source[i])[0] for i in range(len(source)))
    assert captions == [f'photo {i}' for i in range(8)]  # the rows after the long ones are read intact


def test_csv_field_over_the_reader_limit_is_skipped_and_the_file_read_on():
    previous = csv.field_size_limit(1000)  # stands for a field beyond builders.CSV_FIELD_LIMIT
    try:
        text = 'filepath,caption\na.png,short\nb.png,' + 'y' * 5000 + '\nc.png,after\n'
        rows = list(builders._csv_rows(csv.DictReader(io.StringIO(text)), 'pairs.csv'))
    finally:
        csv.field_size_limit(previous)
    assert rows[0]['caption'] == 'short' and rows[2]['caption'] == 'after'
    assert isinstance(rows[1], BadSample) and rows[1].kind == 'long_caption' and 'pairs.csv line 3' in str(rows[1])


# ------------------------------------------------------------------------------------- the per-file bad limit

def test_file_under_the_limit_passes_though_its_bad_samples_come_first(tmp_path):
    # 20 bad of 230 = 8.7 % < the default 10 %; the old running fraction stopped at 20/100 after 100 samples.
    (tmp_path / 'good.png').write_bytes(_png())
    rows = [{'filepath': f'missing{i}.png', 'caption': 'gone'} for i in range(20)]
    rows += [{'filepath': 'good.png', 'caption': f'photo {i}'} for i in range(210)]
    _write_csv(tmp_path / 'early_bad.csv', rows)
    spec = {'name': 'early_bad', 'format': 'csv', 'paths': str(tmp_path / 'early_bad.csv')}
    stats = builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)['train']
    assert (stats.seen, stats.kept, dict(stats.skipped)) == (230, 210, {'missing_file': 20})


def _early_stop_csv(tmp_path, bad, good):
    (tmp_path / 'good.png').write_bytes(_png())
    (tmp_path / 'garbage.png').write_bytes(b'not an image at all')
    rows = [{'filepath': 'garbage.png', 'caption': 'x'}] * bad + [{'filepath': 'good.png', 'caption': 'y'}] * good
    _write_csv(tmp_path / 'hopeless.csv', rows)
    return {'name': 'hopeless', 'format': 'csv', 'paths': str(tmp_path / 'hopeless.csv')}


def _early_stop_tar(tmp_path, bad, good):
    with tarfile.open(tmp_path / 'hopeless.tar', 'w') as tar:
        for i in range(bad + good):
            for ext, data in (('png', b'not an image' if i < bad else _png(i)), ('txt', f'caption {i}'.encode())):
                info = tarfile.TarInfo(f'{i:05d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {'name': 'hopeless', 'format': 'webdataset', 'paths': str(tmp_path / 'hopeless.tar')}


@pytest.mark.parametrize('make', [_early_stop_csv, _early_stop_tar], ids=['csv', 'webdataset'])
def test_file_that_cannot_recover_stops_early_naming_it_and_the_counts(tmp_path, monkeypatch, make):
    spec = make(tmp_path, bad=30, good=170)  # 30 of 200 bad: 21 bad already exceed 10 % of the whole file
    checked = []
    real_check = builders.check_sample
    monkeypatch.setattr(builders, 'check_sample', lambda *a, **k: checked.append(1) or real_check(*a, **k))
    with pytest.raises(BadDataError) as err:
        builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)
    message = str(err.value)
    assert os.path.basename(spec['paths']) in message
    assert '21 bad samples in the first 21 of its 200' in message and 'bad_image=21' in message
    assert 'max_bad_fraction=10.0%' in message and 'stopped early' in message
    assert len(checked) == 21  # the 179 samples after the 21st bad one were never decoded
    assert not builders.is_prepared('hopeless', str(tmp_path / 'tfds'))


def test_file_over_the_limit_at_its_end_still_stops(tmp_path):
    # A compressed shard's length is unknown: it is judged at its end (5 bad of 20 = 25 %).
    with tarfile.open(tmp_path / 'late.tar.gz', 'w:gz') as tar:
        for i in range(20):
            for ext, data in (('png', _png(i) if i < 15 else b'broken'), ('txt', b'caption')):
                info = tarfile.TarInfo(f'{i:05d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    spec = {'name': 'late', 'format': 'webdataset', 'paths': str(tmp_path / 'late.tar.gz')}
    with pytest.raises(BadDataError, match=r'late\.tar\.gz: 5/20 samples bad \(25\.0% > max_bad_fraction=10\.0%\)'):
        builders.prepare_dataset(spec, str(tmp_path / 'tfds'), progress=False)


# ------------------------------------------------------------------------------------- torn metrics.jsonl lines

def _torn_workdir(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # a crash mid-write
    return path


def test_reader_skips_and_reports_a_torn_last_line(tmp_path):
    path = _torn_workdir(tmp_path)
    reports = []
    assert read_metrics(str(tmp_path), log=reports.append) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}]
    assert len(reports) == 1 and str(path) in reports[0] and 'torn last line (3)' in reports[0]


def test_reader_of_a_run_that_has_not_logged_yet_returns_no_records(tmp_path):
    # The writer creates metrics.jsonl before the first step ends: a reader polling a starting run meets it empty.
    for text in ('', '\n', '  \n\n'):
        (tmp_path / 'metrics.jsonl').write_text(text)
        reports = []
        assert read_metrics(str(tmp_path), log=reports.append) == [] and reports == []


def test_writer_starts_a_new_line_after_a_torn_one(tmp_path):
    path = _torn_workdir(tmp_path)
    reports = []
    writer = MetricsWriter(str(tmp_path), log=reports.append)
    writer.write(3, {'loss': 1.25})
    writer.write(4, {'loss': 1.0})
    writer.close()
    assert len(reports) == 1 and str(path) in reports[0] and 'torn line' in reports[0]
    lines = path.read_text().split('\n')
    assert lines[2] == '{"step": 3, "lo' and lines[3].startswith('{"step": 3, "loss": 1.25') and lines[-1] == ''
    read = []
    assert [r['step'] for r in read_metrics(str(tmp_path), log=read.append)] == [1, 2, 3, 4]
    assert 'lines 3' in read[0]  # still reported, now as a line in the middle


def test_eval_readers_and_plots_survive_a_torn_line(tmp_path):
    _torn_workdir(tmp_path)
    (tmp_path / 'eval').mkdir()
    (tmp_path / 'eval' / '2.json').write_text('{"step": 2, "zeroshot/top1": 0.5}')
    (tmp_path / 'eval' / '3.json').write_text('{"step": 3, "zero')  # damaged
    reports = []
    evals = read_eval_results(str(tmp_path), log=reports.append)
    assert evals == {2: {'step': 2, 'zeroshot/top1': 0.5}}
    assert len(reports) == 1 and str(tmp_path / 'eval' / '3.json') in reports[0]
    out = plots.training_curves(read_metrics(str(tmp_path), log=reports.append), evals, str(tmp_path / 'c.png'))
    assert os.path.getsize(out) > 1000 and str(tmp_path / 'metrics.jsonl') in reports[1]


def _events(path):
    """The Event protos of a TensorBoard events file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event  # tensorboardX: the writer's own protobufs

    raw, events, offset = path.read_bytes(), [], 0
    while offset < len(raw):
        (length,) = struct.unpack('<Q', raw[offset:offset + 8])
        events.append(Event.FromString(raw[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_tensorboard_events_are_written_in_the_callers_thread(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(3, {'loss': 2.5, 'lr': 1e-3, 'nan_metric': float('nan')})
    (path,) = (tmp_path / 'tensorboard').iterdir()
    events = _events(path)  # readable before close: each write is flushed
    writer.close()
    assert events[0].file_version == 'brain.Event:2'
    assert events[1].step == 3
    assert {v.tag: round(v.simple_value, 6) for v in events[1].summary.value} == {'loss': 2.5, 'lr': 0.001}
    assert json.loads((tmp_path / 'metrics.jsonl').read_text().replace('NaN', 'null'))['nan_metric'] is None
