"""data.name='wds_stream': webdataset tar shards streamed in place (mmjax/data/stream.py, mmjax/data/wds.py).

Exact resume (also through the checkpoint's data handler and with grain worker processes), shards split between
processes and covering each epoch, a seeded per-epoch shuffle, bad samples and failed shards skipped and counted,
and `mmjax train` on a stream through `mmjax.cli.main`. On a gs:// bucket (the emulator of tests/storage_servers.py):
the same batches as from a local folder, a shard deleted mid-run skipped, and a misspelled bucket refused in one
line before anything compiles."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax import storage
from mmjax.data import decode, pipeline, stream, synthetic, wds
from mmjax.data.decode import BadDataError, DataFileNotFoundError, DataSpecError
from mmjax.data.tokenizers import ByteTokenizer
from mmjax.errors import MmjaxError
from mmjax.training import preflight

pytest_plugins = ['storage_servers']

SHARDS, PER_SHARD, MAX_LEN = 8, 10, 48
TINY = os.path.join(os.path.dirname(__file__), 'tiny_config.py')


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_corpus(root, shards=SHARDS, extra=None, max_bad_fraction=0.2):
    """`shards` tar shards of PER_SHARD samples whose captions start with '<shard> <i> ' (unique ids), a spec."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(root / f'{shard:05d}.tar', 'w') as tar:
            for name, data in (extra or {}).get(shard, []):  # first: met before the shard's good samples
                _add(tar, name, data)
            for i in range(PER_SHARD):
                data, caption = synthetic.photo(rng, 24, 48)
                _add(tar, f'{shard:05d}{i:04d}.jpg', data)
                _add(tar, f'{shard:05d}{i:04d}.txt', f'{shard} {i} {caption}'.encode())
    spec = {'name': 'streamed', 'format': 'webdataset', 'paths': '*.tar',
            'limits': {'max_bad_fraction': max_bad_fraction}}
    (root / 'spec.json').write_text(json.dumps(spec))
    return root


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('wds') / 'shards')


def upload(folder, url):
    """Copies the files of the local `folder` into the bucket folder `url` (through mmjax.storage); returns `url`."""
    for name in sorted(os.listdir(folder)):
        storage.write_bytes_atomic(storage.join(url, name), (folder / name).read_bytes())
    return url


def make_config(root, **overrides):
    c = config_lib.base_config()
    c.data.name = 'wds_stream'
    c.data.spec = storage.join(str(root), 'spec.json')
    c.data.shuffle_buffer = 16
    c.data.open_shards = 2
    c.model.image.image_size = 16
    c.model.text.max_len = MAX_LEN
    c.train.batch_size = 8
    c.eval.zeroshot = False
    for key, value in overrides.items():
        section, leaf = key.split('.')
        c[section][leaf] = value
    return c


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def ids(batches):
    """(shard, index) of every example, read back from its caption."""
    texts = ByteTokenizer(MAX_LEN).decode(np.concatenate([b['text'] for b in batches]))
    return [tuple(int(v) for v in t.split()[:2]) for t in texts]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_have_the_prepared_path_layout(corpus):
    it = pipeline.make_train_loader(make_config(corpus), 0, 1)
    batch = next(it)
    assert sorted(batch) == ['image', 'label', 'text']
    assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
    assert batch['text'].shape == (8, MAX_LEN) and batch['text'].dtype == np.int32
    assert batch['label'].dtype == np.int32 and (batch['label'] == -1).all()
    assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0
    stats = it.stats()
    assert stats['data/bad_samples'] == 0.0 and stats['data/bad_shards'] == 0.0
    assert set(stats) >= {f'data/bad/{k}' for k in decode.BAD_KINDS} | {'data/epoch', 'data/bad_fraction'}
    it.close()


def test_resume_is_exact_through_the_checkpoint_handler(corpus, tmp_path):
    from etils import epath

    from mmjax.training.checkpoint import DataIteratorHandler
    cfg = make_config(corpus)
    reference = take(pipeline.make_train_loader(cfg, 0, 1), 14)  # 112 examples: into the second epoch of 80
    first = pipeline.make_train_loader(cfg, 0, 1)
    assert_same_batches(take(first, 5), reference[:5])
    DataIteratorHandler().save(epath.Path(tmp_path), first)
    saved = json.loads((tmp_path / 'process_0-of-1.json').read_text())
    assert saved['kind'] == 'wds_stream' and saved['inner']['buffer']  # the buffer, as references
    first.close()
    resumed = DataIteratorHandler().restore(epath.Path(tmp_path), pipeline.make_train_loader(cfg, 0, 1))
    assert_same_batches(take(resumed, 9), reference[5:])
    assert resumed.stats()['data/epoch'] >= 1.0
    resumed.close()


@pytest.mark.slow  # starts grain worker processes twice (30 s on a loaded 2-core machine)
def test_resume_is_exact_with_grain_workers(corpus):
    cfg = make_config(corpus, **{'data.num_workers': 2})
    straight = pipeline.make_train_loader(cfg, 0, 1)
    reference = take(straight, 8)
    straight.close()
    first = pipeline.make_train_loader(cfg, 0, 1)
    head = take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    assert len(stream.reader_states(state)) == 2  # one reader per worker, each with its own shards
    resumed = pipeline.make_train_loader(cfg, 0, 1)
    resumed.set_state(state)
    assert_same_batches(head + take(resumed, 5), reference)
    resumed.close()
    shards = [set(ids(reference[w::2])) for w in range(2)]  # worker w made batches w, w + 2, ...
    assert not {s for s, _ in shards[0]} & {s for s, _ in shards[1]}


def test_two_processes_split_and_cover_every_epoch(corpus):
    cfg = make_config(corpus, **{'data.shuffle_buffer': 1, 'train.batch_size': 16})
    loaders = [pipeline.make_train_loader(cfg, p, 2) for p in range(2)]
    per_epoch = SHARDS * PER_SHARD // 2 // 8  # host batches of 8 per process and epoch
    for epoch in range(2):
        seen = [ids(take(it, per_epoch)) for it in loaders]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == [(s, i) for s in range(SHARDS) for i in range(PER_SHARD)], epoch
    plan = stream.Plan(wds.stream_spec(cfg.data.spec), None, 0, 2, 1, 2, 1, 1)
    orders = [plan.assigned(e, 0, 1) for e in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # a new shard order every epoch
    for it in loaders:
        it.close()


def test_shuffle_is_per_epoch_and_seeded(corpus):
    def order(seed, **kw):
        it = pipeline.make_train_loader(make_config(corpus, **{'data.shuffle_buffer': 16, **kw}), 0, 1)
        it_ids = ids(take(it, 20))  # two epochs
        it.close()
        return it_ids[:80], it_ids[80:]

    epoch0, epoch1 = order(0)
    assert (epoch0, epoch1) == order(0)  # deterministic
    assert sorted(epoch0) != epoch0 and epoch0 != epoch1
    assert len(set(epoch0)) > 60 and len(set(epoch1)) > 60  # mostly each epoch's own samples (the buffer spills)
    shard_order = [list(dict.fromkeys(s for s, _ in e)) for e in (epoch0, epoch1)]
    assert shard_order[0] != shard_order[1]
    cfg = make_config(corpus)
    cfg.seed = 7
    it = pipeline.make_train_loader(cfg, 0, 1)
    assert ids(take(it, 10)) != epoch0
    it.close()


def test_bad_samples_are_skipped_and_counted_like_at_prepare_time(tmp_path):
    good, _ = synthetic.photo(np.random.default_rng(5), 24, 40)
    extra = {2: [('bad0.jpg', good[: len(good) // 3]), ('bad0.txt', b'truncated jpeg'),  # bad_image
                 ('bad1.jpg', good)]}  # no caption at all: empty_caption
    root = write_corpus(tmp_path / 'bad', extra=extra)
    for name, kind in (('bad0', 'bad_image'), ('bad1', 'empty_caption')):  # the prepared path's kinds
        sample = next(s for s in wds.iter_shard(str(root / '00002.tar')) if s[0] == name)
        with pytest.raises(decode.BadSample) as info:
            decode.check_sample(sample[1], sample[2])
        assert info.value.kind == kind
    it = pipeline.make_train_loader(make_config(root, **{'data.shuffle_buffer': 1}), 0, 1)
    seen = ids(take(it, 20))  # two epochs of 80 good samples
    assert sorted(seen) == sorted([(s, i) for s in range(SHARDS) for i in range(PER_SHARD)] * 2)
    stats = it.stats()
    assert stats['data/bad/bad_image'] == 2.0 and stats['data/bad/empty_caption'] == 2.0  # once per epoch
    assert stats['data/bad_samples'] == 4.0 and stats['data/bad_fraction'] == pytest.approx(4 / 164, abs=0.01)
    it.close()


def test_a_shard_deleted_mid_run_is_reported_and_skipped(tmp_path, capfd):
    root = write_corpus(tmp_path / 'gone')
    cfg = make_config(root, **{'data.shuffle_buffer': 4, 'data.open_shards': 1})
    it = pipeline.make_train_loader(cfg, 0, 1)
    take(it, 1)
    plan = stream.Plan(wds.stream_spec(cfg.data.spec), None, 0, 1, *pipeline.stream_seeds(cfg.seed), 4, 1)
    order = plan.assigned(0, 0, 1)
    (root / f'{order[-1]:05d}.tar').unlink()  # the last shard of epoch 0: not opened yet
    seen = ids(take(it, 15))  # through epoch 0 and into epoch 1
    assert it.stats()['data/bad_shards'] == 1.0
    assert order[-1] not in {s for s, _ in seen}
    assert f'{order[-1]:05d}.tar failed and is skipped' in capfd.readouterr().err
    (root / f'{order[-2]:05d}.tar').unlink()  # a second of 8 > limits.max_bad_fraction=0.2
    with pytest.raises(BadDataError, match='max_bad_fraction'):
        take(it, 20)
    it.close()


def test_another_process_count_resumes_approximately(corpus, capfd):
    cfg = make_config(corpus, **{'train.batch_size': 16})
    half = pipeline.make_train_loader(cfg, 0, 2)
    take(half, 6)  # 48 of its 40 per epoch
    state = json.loads(json.dumps(half.get_state()))
    half.close()
    whole = pipeline.make_train_loader(cfg, 0, 1)
    whole.set_state(state)
    assert next(whole)['image'].shape == (16, 16, 16, 3)
    assert 'resuming approximately' in capfd.readouterr().err
    assert whole.stats()['data/epoch'] >= 1.0
    whole.close()


def test_spec_and_config_problems(corpus, tmp_path):
    assert wds.expand_braces('a/{08..10}.tar') == ['a/08.tar', 'a/09.tar', 'a/10.tar']
    spec = wds.stream_spec(json.dumps({'format': 'webdataset', 'paths': '0000{0..1}.tar', 'base_dir': str(corpus)}))
    assert [os.path.basename(s) for s in spec.shards] == ['00000.tar', '00001.tar']
    with pytest.raises(DataFileNotFoundError, match='missing'):
        wds.stream_spec(json.dumps({'format': 'webdataset', 'paths': 'missing/*.tar', 'base_dir': str(corpus)}))
    with pytest.raises(DataSpecError, match="data.name='spec'"):
        wds.stream_spec(json.dumps({'format': 'csv', 'paths': 'a.csv'}))
    preflight.check(make_config(corpus), 8)
    with pytest.raises(config_lib.ConfigError) as info:
        preflight.check(make_config(corpus, **{'data.spec': str(tmp_path / 'nope.json'), 'data.open_shards': 0}), 8)
    text = '\n'.join(info.value.problems)
    assert 'nope.json' in text and 'data.open_shards' in text
    with pytest.raises(DataSpecError, match='cannot feed'):
        pipeline.make_train_loader(make_config(corpus, **{'data.num_workers': 3, 'train.batch_size': 24}), 0, 3)


@pytest.mark.slow
def test_mmjax_train_on_a_stream(corpus, tmp_path):
    from mmjax import cli
    from mmjax.training.metrics import read_metrics
    workdir = tmp_path / 'w'
    rc = cli.main(['train', '--config', TINY, '--workdir', str(workdir), '--quiet', '--config.data.name=wds_stream',
                   f'--config.data.spec={corpus / "spec.json"}', '--config.train.steps=4',
                   '--config.data.shuffle_buffer=32'])
    assert rc == 0
    rows = read_metrics(str(workdir))
    assert rows[-1]['step'] == 4 and rows[-1]['data/bad_samples'] == 0.0 and 'data/bad_shards' in rows[-1]
    saved = json.loads((workdir / 'checkpoints' / '4' / 'data' / 'process_0-of-1.json').read_text())
    assert saved['kind'] == 'wds_stream' and saved['batches'] == 4
    rc = cli.main(['train', '--config', TINY, '--workdir', str(workdir), '--quiet', '--config.data.name=wds_stream',
                   f'--config.data.spec={corpus / "spec.json"}', '--config.train.steps=6',
                   '--config.data.shuffle_buffer=32'])  # resumes the stream from the step-4 checkpoint
    assert rc == 0 and read_metrics(str(workdir))[-1]['step'] == 6


def test_a_bucket_streams_the_same_batches_as_a_local_folder(corpus, gs_bucket):
    remote = upload(corpus, f'{gs_bucket}/shards')
    spec = wds.stream_spec(f'{remote}/spec.json')  # relative 'paths' are read from the spec's bucket folder
    assert spec.shards == tuple(f'{remote}/{i:05d}.tar' for i in range(SHARDS))
    braces = {'format': 'webdataset', 'paths': f'{remote}/{{00000..{SHARDS - 1:05d}}}.tar'}  # checked by one listing
    assert wds.stream_spec(json.dumps(braces)).shards == spec.shards
    with pytest.raises(DataFileNotFoundError, match=f'{remote}/{SHARDS:05d}.tar'):
        wds.stream_spec(json.dumps({**braces, 'paths': f'{remote}/{{00000..{SHARDS:05d}}}.tar'}))
    local, bucket = (pipeline.make_train_loader(make_config(root), 0, 1) for root in (corpus, remote))
    assert_same_batches(take(local, 12), take(bucket, 12))  # into the second epoch
    assert bucket.stats()['data/epoch'] >= 1.0 and bucket.stats()['data/bad_shards'] == 0.0
    local.close()
    bucket.close()


def test_a_shard_deleted_from_the_bucket_mid_run_is_reported_and_skipped(gs_bucket, tmp_path, capfd):
    remote = upload(write_corpus(tmp_path / 'gone'), f'{gs_bucket}/gone')
    cfg = make_config(remote, **{'data.shuffle_buffer': 4, 'data.open_shards': 1})
    it = pipeline.make_train_loader(cfg, 0, 1)
    take(it, 1)
    plan = stream.Plan(wds.stream_spec(cfg.data.spec), None, 0, 1, *pipeline.stream_seeds(cfg.seed), 4, 1)
    order = plan.assigned(0, 0, 1)
    storage.remove(f'{remote}/{order[-1]:05d}.tar')  # the last shard of epoch 0: not opened yet
    seen = ids(take(it, 15))  # through epoch 0 and into epoch 1: the run goes on
    assert it.stats()['data/bad_shards'] == 1.0 and order[-1] not in {s for s, _ in seen}
    assert f'shard {remote}/{order[-1]:05d}.tar failed and is skipped' in capfd.readouterr().err
    storage.remove(f'{remote}/{order[-2]:05d}.tar')  # a second of 8 > limits.max_bad_fraction=0.2
    with pytest.raises(BadDataError, match='max_bad_fraction'):
        take(it, 20)
    it.close()


def test_an_unreachable_bucket_stops_the_run_in_one_line_before_compiling(gs_bucket, tmp_path, capsys):
    from mmjax import cli
    workdir = tmp_path / 'w'
    argv = ['train', '--config', TINY, '--workdir', str(workdir), '--quiet', '--config.data.name=wds_stream']
    misspelled = gs_bucket.replace('mmjax-test', 'mmjax-tset', 1)
    storage.write_text_atomic(f'{gs_bucket}/spec.json', json.dumps(
        {'format': 'webdataset', 'paths': f'{misspelled}/shards/*.tar'}))
    for spec, named in ((f'{misspelled}/spec.json', f'{misspelled}/spec.json'),  # the spec's bucket
                        (f'{gs_bucket}/spec.json', f'{misspelled}/shards/*.tar')):  # the shards' bucket
        assert cli.main([*argv, f'--config.data.spec={spec}']) == 1
        err = capsys.readouterr().err
        assert err.startswith('mmjax: error: cannot reach') and err.count('\n') == 1, err
        assert named in err and 'is not reachable' in err
    assert not workdir.exists()  # refused before the run started
    with pytest.raises(MmjaxError, match='mistyped URL'):  # one slash: refused, not made a local folder 'gs:'
        wds.stream_spec('gs:/mmjax-test/spec.json')
    assert not os.path.exists('gs:') and not (tmp_path / 'gs:').exists()
