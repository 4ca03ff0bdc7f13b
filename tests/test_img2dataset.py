"""From a URL list to training, as a user runs it: img2dataset crawls a local web server (tests/image_server.py:
real JPEG photos of the embedded digits, plus 404s, a response that hangs past the timeout, truncated JPEGs, HTML
pages and photos without a caption) into webdataset shards; the shards go to a gs:// bucket (the emulator of
tests/storage_servers.py); mmjax streams them from the bucket (data.name='wds_stream') to train the tiny model and
resumes exactly, and prepares the same shards (data.name='spec' path). img2dataset's own failure records and the bad
samples mmjax finds in what it kept are counted by kind. Nothing leaves 127.0.0.1."""

import collections
import dataclasses
import json
import os
import pathlib
import urllib.parse

import jax
import numpy as np
import pandas as pd
import pytest
from image_server import ImageServer
from test_stream import TINY, upload

import mmjax
from mmjax import cli, storage
from mmjax.data import builders, decode, wds
from mmjax.training.metrics import read_metrics

pytest_plugins = ['storage_servers']

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COUNTS = {'good': 32, 'uncaptioned': 2, 'missing': 4, 'hanging': 2, 'truncated': 3, 'html': 3}
SERVED = ('good', 'uncaptioned', 'truncated', 'html')  # answered 200: img2dataset keeps the bytes as served
# What mmjax's checks make of each kind img2dataset kept.
FOUND = {'good': 'ok', 'uncaptioned': 'empty_caption', 'truncated': 'bad_image', 'html': 'bad_image'}
PER_SHARD, TIMEOUT_S = 12, 3
LIMITS = {'max_bad_fraction': 0.35}  # 8 of the 40 kept are bad (20%), up to 3 of a shard's 10


@dataclasses.dataclass(frozen=True)
class Crawl:
    folder: pathlib.Path  # img2dataset's output: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json
    rows: list  # the URL list: (url, caption, kind)
    requests: collections.Counter  # the paths the server was asked for

    def table(self) -> pd.DataFrame:
        """img2dataset's per-URL records (key, url, caption, kind, status, error_message, ...)."""
        return pd.concat([pd.read_parquet(p) for p in sorted(self.folder.glob('*.parquet'))], ignore_index=True)

    def stats(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob('*_stats.json'))]


@pytest.fixture(scope='module')
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp('crawl')
    with pytest.MonkeyPatch.context() as env:
        # Set before img2dataset imports albumentations (here and in the processes it spawns): no update check.
        env.setenv('NO_ALBUMENTATIONS_UPDATE', '1')
        for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'NO_PROXY'):
            env.delenv(name, raising=False)
        for name in ('http_proxy', 'https_proxy'):  # a request anywhere but 127.0.0.1 fails at once
            env.setenv(name, 'http://127.0.0.1:9')
        env.setenv('no_proxy', '127.0.0.1')
        import img2dataset  # after the variables above (its import checks for updates unless told not to)

        with ImageServer(hang_s=60) as server:
            rows = server.rows(**COUNTS)
            pd.DataFrame(rows, columns=['url', 'caption', 'kind']).to_parquet(root / 'urls.parquet')
            img2dataset.download(
                url_list=str(root / 'urls.parquet'), input_format='parquet', url_col='url', caption_col='caption',
                save_additional_columns=['kind'], output_folder=str(root / 'shards'), output_format='webdataset',
                processes_count=1, thread_count=8, number_sample_per_shard=PER_SHARD, timeout=TIMEOUT_S, retries=0,
                disable_all_reencoding=True, compute_hash=None, enable_wandb=False)
            requests = collections.Counter(server.requests)
    folder = root / 'shards'
    (folder / 'spec.json').write_text(json.dumps({'name': 'crawl', 'format': 'webdataset', 'paths': '*.tar',
                                                  'limits': LIMITS}))
    return Crawl(folder, rows, requests)


def no_local_url_folders(*roots):
    """Folders named `gs:` / `s3:` (a URL a local file API took for a relative path) in the working directory or
    anywhere under `roots`."""
    found = [os.path.join(d, n) for root in roots for d, names, _ in os.walk(root) for n in names
             if n in ('gs:', 's3:')]
    return found + [n for n in ('gs:', 's3:') if os.path.exists(n)]


def test_img2dataset_records_each_failure_by_kind(crawl):
    assert crawl.requests == collections.Counter(urllib.parse.urlparse(url).path for url, _, _ in crawl.rows)
    stats = crawl.stats()
    assert len(stats) == len(crawl.rows) // PER_SHARD + 1  # 46 rows, 12 a shard
    total = {k: sum(s[k] for s in stats) for k in ('count', 'successes', 'failed_to_download', 'failed_to_resize')}
    assert total == {'count': len(crawl.rows), 'successes': sum(COUNTS[k] for k in SERVED),
                     'failed_to_download': COUNTS['missing'] + COUNTS['hanging'], 'failed_to_resize': 0}
    errors = collections.Counter()
    for s in stats:
        errors.update({'timed out' if 'timed out' in k else k: v for k, v in s['status_dict'].items()})
    assert errors == {'success': total['successes'], 'HTTP Error 404: Not Found': COUNTS['missing'],
                      'timed out': COUNTS['hanging']}
    table = crawl.table()
    assert table.groupby(['kind', 'status']).size().to_dict() == {
        **{(k, 'success'): COUNTS[k] for k in SERVED}, ('missing', 'failed_to_download'): COUNTS['missing'],
        ('hanging', 'failed_to_download'): COUNTS['hanging']}


def test_mmjax_finds_the_bad_samples_img2dataset_kept(crawl, gs_bucket):
    remote = upload(crawl.folder, f'{gs_bucket}/crawl')
    spec = wds.stream_spec(f'{remote}/spec.json')
    assert spec.shards == tuple(f'{remote}/{i:05d}.tar' for i in range(len(crawl.stats())))
    found = {}
    for shard in spec.shards:
        for key, image, captions in wds.iter_shard(shard):  # streamed from the bucket
            try:
                decode.check_sample(image, captions, spec.limits)
                found[key] = 'ok'
            except decode.BadSample as bad:
                found[key] = bad.kind
    kept = crawl.table().query("status == 'success'")
    assert found == {key: FOUND[kind] for key, kind in zip(kept['key'], kept['kind'])}
    assert collections.Counter(found.values()) == {'ok': 32, 'bad_image': 6, 'empty_caption': 2}


def _train(workdir, spec, *extra):
    return cli.main(['train', '--config', TINY, '--workdir', str(workdir), '--quiet', '--config.data.name=wds_stream',
                     f'--config.data.spec={spec}', '--config.data.shuffle_buffer=16', '--config.data.open_shards=2',
                     '--config.train.steps=4', *extra])


def test_train_from_the_bucket_and_count_the_bad_samples(crawl, gs_bucket, tmp_path):
    spec = f'{upload(crawl.folder, f"{gs_bucket}/crawl")}/spec.json'
    assert _train(tmp_path / 'w', spec) == 0
    rows = read_metrics(str(tmp_path / 'w'))
    assert [r['step'] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in rows)
    last = rows[-1]
    bad = {k: last[f'data/bad/{k}'] for k in decode.BAD_KINDS}  # skipped where read, every epoch
    assert bad['bad_image'] >= 1 and {k for k, v in bad.items() if v} <= {'bad_image', 'empty_caption'}, bad
    assert last['data/bad_samples'] == sum(bad.values()) and last['data/bad_shards'] == 0
    assert 0.05 < last['data/bad_fraction'] < LIMITS['max_bad_fraction']  # 8 of the 40 kept, per epoch
    saved = json.loads((tmp_path / 'w' / 'checkpoints' / '4' / 'data' / 'process_0-of-1.json').read_text())
    assert saved['kind'] == 'wds_stream' and saved['batches'] == 4
    assert not no_local_url_folders(tmp_path, crawl.folder.parent)


@pytest.mark.slow  # three runs of the tiny model (80 s on a loaded 2-core machine)
def test_resume_from_the_bucket_is_exact(crawl, gs_bucket, tmp_path):
    spec = f'{upload(crawl.folder, f"{gs_bucket}/crawl")}/spec.json'
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    assert _train(straight, spec) == 0
    assert _train(resumed, spec, '--stop-at-step=2') == 0
    assert _train(resumed, spec) == 0  # resumes the model and the stream from the step-2 checkpoint
    a = {m['step']: m['loss'] for m in read_metrics(str(straight))}
    b = {m['step']: m['loss'] for m in read_metrics(str(resumed))}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a == b  # the same batches: identical losses, not close
    pa, pb = (jax.device_get(mmjax.load(str(w)).encoder.params) for w in (straight, resumed))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    assert not no_local_url_folders(tmp_path)


def test_prepare_the_same_shards(crawl, tmp_path):
    spec = {'name': 'crawl', 'format': 'webdataset', 'paths': str(crawl.folder / '*.tar'), 'limits': LIMITS}
    data_dir = str(tmp_path / 'tfds')
    stats = builders.prepare_dataset(spec, data_dir, progress=False)['train']
    assert stats.kept == COUNTS['good'] and dict(stats.skipped) == {'bad_image': 6, 'empty_caption': 2}
    source = builders.load_source('crawl', data_dir, 'train')
    assert len(source) == COUNTS['good']
    captions = {c for i in range(len(source)) for c in builders.record_captions(source[i])}
    assert all(c.startswith('a photo of the number ') for c in captions)
    assert storage.exists(builders.dataset_dir('crawl', data_dir))


@pytest.mark.slow  # the demo-sized model (0.25M parameters, batch 128): 45 s on a loaded 2-core machine
def test_the_documented_command_trains_the_demo_model_from_the_bucket(crawl, gs_bucket, tmp_path):
    spec = f'{upload(crawl.folder, f"{gs_bucket}/crawl")}/spec.json'
    workdir = tmp_path / 'crawl'
    # docs/data.md, "img2dataset: from a URL list to training", step 4 (stopped after 2 of its 800 steps)
    assert cli.main(['train', '--config', os.path.join(ROOT, 'configs', 'demo.py'), '--workdir', str(workdir),
                     '--quiet', '--config.data.name=wds_stream', f'--config.data.spec={spec}',
                     '--config.eval.zeroshot=False', '--stop-at-step=2']) == 0
    rows = read_metrics(str(workdir))
    assert rows[-1]['step'] == 2 and np.isfinite(rows[-1]['loss']) and rows[-1]['data/bad_shards'] == 0
    assert not no_local_url_folders(tmp_path)
