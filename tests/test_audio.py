"""Audio: espeak-ng spoken numbers, the JAX log-mel front end against librosa on that speech, and the
AudioTransformer (shapes, padding mask, config build, 1 device == 8 devices under each mesh layout)."""

import dataclasses
import functools
import math
import os
import shutil

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mmjax.runtime.sharding  # noqa: E402
from mmjax.config import DEFAULT_RULES  # noqa: E402
from mmjax.data import speech  # noqa: E402
from mmjax.data.audio import pad_batch, resample  # noqa: E402
from mmjax.models import AudioTransformer, build_model  # noqa: E402
from mmjax.models.frontend import LogMel, mel_filterbank  # noqa: E402

# Measured: relative (Frobenius) error of the mel power ~1.3e-7, log-mel max abs error ~1.7e-3 dB (float32 JAX
# against float64 librosa 0.11). The bounds leave ~60x headroom for other CPUs / XLA versions.
POWER_REL_TOL = 1e-5
LOG_MEL_DB_TOL = 0.01

SMALL_GRID = speech.Grid(accents=('en-us', 'en'), variants=('m1', 'f3'), rates=(140, 200), pitches=(50,))
AUDIO = dict(sample_rate=16000, n_fft=400, hop=160, n_mels=32, max_frames=96, patch_time=8, patch_freq=8,
             width=32, depth=2, num_heads=2, mlp_dim=64)
LAYOUTS = {'data=8': (8, 1, 1), 'fsdp=8': (1, 8, 1), 'data=2,fsdp=2,tensor=2': (2, 2, 2)}


@pytest.fixture(scope='module')
def speech_dir(tmp_path_factory):
    if shutil.which('espeak-ng') is None:  # every test that needs real speech depends on this fixture
        pytest.skip(f'espeak-ng is not installed; {speech.INSTALL_HINT}')
    return str(tmp_path_factory.mktemp('speech'))


@pytest.fixture(scope='module')
def clips(speech_dir):
    return speech.load(speech_dir, SMALL_GRID)


def speech_batch(clips, n=8):
    """n clips spread over words/voices: (float32 [n, T] zero-padded, int32 [n] lengths), T = longest."""
    index = np.linspace(0, len(clips) - 1, n).round().astype(int)
    waves = [clips.float_waveforms()[i, :clips.lengths[i]] for i in index]
    return pad_batch(waves, clips.sample_rate, 16000)


# ---------------------------------------------------------------- speech synthesis

def test_speech_counts_labels_split_and_cache(clips, speech_dir):
    voices = SMALL_GRID.voices
    assert voices == ('en-us+m1', 'en-us+f3', 'en+m1', 'en+f3')
    n = 10 * 4 * 2
    assert len(clips) == n == len(SMALL_GRID) and clips.sample_rate == 16000
    np.testing.assert_array_equal(clips.labels, np.repeat(np.arange(10), 8))
    np.testing.assert_array_equal(clips.voices, np.tile(np.repeat(voices, 2), 10))
    np.testing.assert_array_equal(clips.rates, np.tile([140, 200], 40))
    held_out = np.tile([(v + r) % speech.HOLDOUT_MODULUS == 0 for v in range(4) for r in range(2)], 10)
    np.testing.assert_array_equal(clips.test, held_out)
    test, train = clips.split('test'), clips.split('train')
    assert len(test) == 10 * held_out[:8].sum() and len(train) + len(test) == n
    assert set(zip(test.voices, test.rates)).isdisjoint(zip(train.voices, train.rates))
    # Real speech: 0.15..1 s, loud, zero padding after each clip, slow speech longer than fast speech.
    assert clips.waveforms.dtype == np.int16 and clips.waveforms.shape == (n, clips.lengths.max())
    assert 2400 < clips.lengths.min() and clips.lengths.max() < 16000
    assert all(np.abs(w[:l]).max() > 3000 and not w[l:].any() for w, l in zip(clips.waveforms, clips.lengths))
    assert clips.lengths[clips.rates == 140].mean() > 1.2 * clips.lengths[clips.rates == 200].mean()
    # Built once: the cache file exists and a second load reads it back unchanged.
    assert os.path.isfile(speech.cache_path(speech_dir, SMALL_GRID))
    cached = speech.load(speech_dir, SMALL_GRID)
    for field in dataclasses.fields(clips):
        np.testing.assert_array_equal(getattr(cached, field.name), getattr(clips, field.name))


def test_speech_synthesis_is_deterministic(clips):
    grid = dataclasses.replace(SMALL_GRID, words=('seven', 'two'), accents=('en',))
    again = speech.synthesize(grid, num_threads=1)
    rows = np.flatnonzero(np.isin(clips.labels, [7, 2]) & np.char.startswith(clips.voices, 'en+'))
    rows = np.concatenate([rows[clips.labels[rows] == 7], rows[clips.labels[rows] == 2]])
    np.testing.assert_array_equal(again.lengths, clips.lengths[rows])
    np.testing.assert_array_equal(again.voices, clips.voices[rows])
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(again.waveforms[i, :again.lengths[i]], clips.waveforms[row, :clips.lengths[row]])


def test_every_default_voice_rate_and_pitch_sounds_different(speech_dir):
    grid = dataclasses.replace(speech.Grid(), words=('four',))
    data = speech.synthesize(grid)
    assert len(data) == len(speech.ACCENTS) * len(speech.VARIANTS) * len(speech.RATES) * len(speech.PITCHES)
    distinct = {data.waveforms[i, :data.lengths[i]].tobytes() for i in range(len(data))}
    assert len(distinct) == len(data)


def test_parse_wav_reads_streamed_wav_with_placeholder_sizes():
    samples = (np.arange(100) * 37 % 2000 - 1000).astype(np.int16)
    header = (b'RIFF' + (0x7FFFFFFF).to_bytes(4, 'little') + b'WAVEfmt ' + (16).to_bytes(4, 'little')
              + (1).to_bytes(2, 'little') + (1).to_bytes(2, 'little') + (22050).to_bytes(4, 'little')
              + (44100).to_bytes(4, 'little') + (2).to_bytes(2, 'little') + (16).to_bytes(2, 'little')
              + b'data' + (0x7FFFFFDB).to_bytes(4, 'little'))
    parsed, rate = speech.parse_wav(header + samples.tobytes())
    assert rate == 22050
    np.testing.assert_array_equal(parsed, samples)


# ---------------------------------------------------------------- log-mel front end

@pytest.mark.parametrize('mel_scale', ['slaney', 'htk'])
def test_mel_filterbank_matches_librosa(mel_scale):
    librosa = pytest.importorskip('librosa', reason='librosa is a test dependency: pip install librosa')
    for sr, n_fft, n_mels, f_min, f_max in [(16000, 400, 64, 0.0, None), (16000, 1024, 128, 20.0, 7600.0),
                                            (22050, 511, 40, 0.0, None)]:
        ours = mel_filterbank(sr, n_fft, n_mels, f_min, f_max, mel_scale)
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max,
                                  htk=mel_scale == 'htk', norm='slaney')
        np.testing.assert_allclose(ours, ref.T, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('frontend', [LogMel(), LogMel(n_fft=512, hop=128, n_mels=80, mel_scale='htk'),
                                      LogMel(n_fft=1024, hop=256, n_mels=128, f_min=20.0, f_max=7600.0)],
                         ids=['400-160-64-slaney', '512-128-80-htk', '1024-256-128-band'])
def test_log_mel_matches_librosa_on_synthesised_speech(clips, frontend):
    librosa = pytest.importorskip('librosa', reason='librosa is a test dependency: pip install librosa')
    waves, lengths = speech_batch(clips, n=6)
    log_mel = np.asarray(jax.jit(lambda w: frontend(w, 16000))(waves))
    power = np.asarray(jax.jit(frontend.power_mel)(waves))
    assert log_mel.shape == (6, 1 + waves.shape[1] // frontend.hop, frontend.n_mels) and log_mel.dtype == np.float32
    for i, n in enumerate(lengths):
        ref = librosa.feature.melspectrogram(
            y=waves[i, :n].astype(np.float64), sr=16000, n_fft=frontend.n_fft, hop_length=frontend.hop,
            window='hann', center=True, pad_mode='constant', power=2.0, n_mels=frontend.n_mels,
            fmin=frontend.f_min, fmax=frontend.f_max, htk=frontend.mel_scale == 'htk', norm='slaney').T
        ref_db = librosa.power_to_db(ref, ref=1.0, amin=1e-10, top_db=None)
        frames = frontend.num_frames(int(n))
        assert ref.shape[0] == frames
        rel = np.linalg.norm(power[i, :frames] - ref) / np.linalg.norm(ref)
        assert rel < POWER_REL_TOL, rel
        np.testing.assert_allclose(log_mel[i, :frames], ref_db, rtol=0, atol=LOG_MEL_DB_TOL)
        assert ref_db.max() - ref_db.min() > 60  # speech with silences: a real dynamic range was compared


def test_wrong_sample_rate_is_a_clear_error():
    frontend = LogMel(sample_rate=16000)
    with pytest.raises(ValueError, match=r'sample rate 22050 Hz but the front end expects 16000 Hz'):
        frontend(np.zeros((1, 1600), np.float32), 22050)
    with pytest.raises(ValueError, match=r'sample rate 8000 Hz'):
        pad_batch([np.zeros(800, np.float32)], 8000, 16000)
    # The fix the message names works: resampled audio is accepted.
    wave = resample(np.sin(np.arange(2205) / 5.0), 22050, 16000)
    assert wave.shape == (1600,)
    waves, _ = pad_batch([wave], 16000, 16000)
    assert frontend(waves, 16000).shape == (1, 1 + 1600 // 160, 64)


# ---------------------------------------------------------------- AudioTransformer

def tower(**overrides):
    return AudioTransformer(**{**AUDIO, **overrides})


@pytest.fixture(scope='module')
def tower_and_vars(clips):
    model = tower()
    waves, lengths = speech_batch(clips, n=4)
    variables = jax.jit(model.init)(jax.random.key(0), waves, lengths)
    return model, variables, waves, lengths


def test_audio_transformer_shapes(tower_and_vars):
    model, variables, waves, lengths = tower_and_vars
    tokens, pooled = jax.jit(model.apply)(variables, waves, lengths)
    frames = 1 + waves.shape[1] // 160
    n = 1 + math.ceil(frames / 8) * (32 // 8)
    assert tokens.shape == (4, n, 32) and pooled.shape == (4, 32)
    assert np.isfinite(np.asarray(tokens)).all()
    np.testing.assert_array_equal(pooled, tokens[:, 0])
    assert variables['params']['pos_embed'].value.shape == (1 + 12 * 4, 32)
    assert variables['params']['patch_embed']['kernel'].value.shape == (64, 32)
    assert nn.get_partition_spec(variables)['params']['patch_embed']['kernel'] == jax.sharding.PartitionSpec(
        'patch', 'embed')
    # The dict form used by the model's batch gives the same result.
    tokens2, _ = jax.jit(model.apply)(variables, {'waveform': waves, 'length': lengths})
    np.testing.assert_allclose(tokens2, tokens, atol=1e-5)
    with pytest.raises(ValueError, match='max_frames'):
        model.apply(variables, np.zeros((1, 96 * 160), np.float32))


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_padding_is_ignored(tower_and_vars, pool):
    _, variables, waves, lengths = tower_and_vars  # the pooling mode does not change the parameters
    model = tower(pool=pool)
    apply = jax.jit(model.apply)
    # Cut every clip mid-word just after its loudest sample, so loud speech lies right before (and after) each
    # clip's end, and inside a time patch (8 frames), so the last patch is only partly valid.
    cut = []
    for wave, n in zip(waves, lengths):
        end = int(np.argmax(np.abs(wave[:int(0.7 * n)]))) + 1
        cut.append(end + 160 if (1 + end // 160) % 8 == 0 else end)
    lengths = np.array(cut, np.int32)
    shortest, longest = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert np.abs(waves[shortest, lengths[shortest] - 200:lengths[shortest]]).max() > 0.05
    assert (1 + lengths[shortest] // 160) % 8 != 0
    tokens, pooled = apply(variables, waves, lengths)
    # Padding samples replaced by loud noise: nothing changes.
    noisy = waves.copy()
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        noisy[i, n:] = rng.normal(0.0, 0.5, waves.shape[1] - n)
    tokens_noisy, pooled_noisy = apply(variables, noisy, lengths)
    np.testing.assert_allclose(pooled_noisy, pooled, atol=1e-5)
    np.testing.assert_allclose(tokens_noisy, tokens, atol=1e-5)
    # ... but the lengths matter: treating the noise as real audio does change the output.
    _, pooled_unmasked = apply(variables, noisy, np.full_like(lengths, waves.shape[1]))
    assert np.abs(np.asarray(pooled_unmasked) - np.asarray(pooled)).max() > 1e-2
    # A clip alone (no padding) gives the same valid tokens as inside the padded batch; padded ones are zero.
    n_freq = 32 // 8
    for i in (shortest, longest):
        n = lengths[i]
        alone_tokens, alone_pooled = apply(variables, waves[i:i + 1, :n], None)
        valid = alone_tokens.shape[1]
        assert valid == 1 + math.ceil((1 + n // 160) / 8) * n_freq
        np.testing.assert_allclose(alone_pooled[0], pooled[i], atol=1e-5)
        np.testing.assert_allclose(alone_tokens[0], tokens[i, :valid], atol=1e-5)
        assert not np.asarray(tokens[i, valid:]).any()



@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_prompts_are_dropped_from_the_audio_tokens(tower_and_vars, pool):
    """Prompt tuning on the audio tower: the prompts change what the tower computes, yet its tokens keep their
    shape (prompts dropped; mean pooling over the patches only) and the pooled-only pass equals the full one."""
    _, variables, waves, lengths = tower_and_vars
    plain, prompted = tower(pool=pool), tower(pool=pool, num_prompts=3)
    tuned = prompted.init(jax.random.key(1), waves, lengths)
    tokens, pooled = jax.jit(prompted.apply)(tuned, waves, lengths)
    plain_tokens, plain_pooled = jax.jit(plain.apply)(variables, waves, lengths)
    assert tuned['params']['prompts'].value.shape == (3, 32)
    assert tokens.shape == plain_tokens.shape
    _, pooled_only = jax.jit(functools.partial(prompted.apply, return_tokens=False))(tuned, waves, lengths)
    np.testing.assert_allclose(pooled_only, pooled, atol=1e-5)
    if pool == 'cls':
        np.testing.assert_array_equal(pooled, tokens[:, 0])
    # Same weights but no prompts: a different result.
    without = {'params': {k: v for k, v in tuned['params'].items() if k != 'prompts'}}
    assert np.abs(np.asarray(jax.jit(plain.apply)(without, waves, lengths)[1]) - np.asarray(pooled)).max() > 1e-3

def model_config():
    return ml_collections.ConfigDict(dict(
        embed_dim=16, dtype='float32', param_dtype='float32', remat='none', scan_layers=False, loss='softmax',
        logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100), logit_bias_init=None,
        text=dict(vocab_size=259, max_len=16, width=32, depth=1, num_heads=2, mlp_dim=64, causal=True, pool='eot'),
        audio={**AUDIO, 'depth': 1}))


def text_batch(n=8, length=16):
    tokens = np.zeros((n, length), np.int32)
    for i in range(n):
        k = 4 + i
        tokens[i, 0], tokens[i, 1:k - 1], tokens[i, k - 1] = 1, 3 + np.arange(k - 2) * 7 % 250, 2
    return tokens


def test_build_model_with_audio_section(mesh_reference):
    _, _, variables, out = mesh_reference  # build_model(config.model with an 'audio' section), run on 1 device
    assert set(variables['params']) == {'audio', 'text', 'logit_scale'}
    assert set(variables['params']['audio']) == {'encoder', 'head'}
    assert out['embeddings']['audio'].shape == (8, 16)
    np.testing.assert_allclose(np.linalg.norm(out['embeddings']['audio'], axis=-1), 1.0, rtol=1e-5)
    bad = model_config()
    bad.audio.hop_length = 160
    with pytest.raises(ValueError, match='model.audio.hop_length'):
        build_model(bad)


def _run_on_mesh(model, batch, layout, devices):
    """Sharded init (state born sharded) and forward under `layout` -> (variables, host outputs)."""
    d, f, t = layout
    mesh = mmjax.runtime.sharding.make_mesh(ml_collections.ConfigDict(dict(data=d, fsdp=f, tensor=t)), devices)
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), batch)
        batch = jax.device_put(batch, mmjax.runtime.sharding.batch_sharding(mesh))
        out = jax.jit(model.apply)(variables, batch)
    return variables, jax.device_get(out)


@pytest.fixture(scope='module')
def mesh_reference(clips):
    model = build_model(model_config())
    waves, lengths = speech_batch(clips)
    batch = {'audio': {'waveform': waves, 'length': lengths}, 'text': text_batch()}
    variables, out = _run_on_mesh(model, batch, (1, 1, 1), jax.devices()[:1])
    return model, batch, jax.device_get(variables), out


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (virtual) devices')
@pytest.mark.parametrize('name', list(LAYOUTS))
def test_audio_model_on_8_devices_equals_1_device(mesh_reference, name, capfd):
    model, batch, ref_variables, ref_out = mesh_reference
    variables, out = _run_on_mesh(model, batch, LAYOUTS[name], jax.devices())
    audio = variables['params']['audio']['encoder']
    assert audio['transformer']['block_0']['mlp']['fc_in']['kernel'].value.sharding.spec == P('fsdp', 'tensor')
    assert audio['patch_embed']['kernel'].value.sharding.spec == P(None, 'fsdp')
    for leaf, ref in zip(jax.tree.leaves(jax.device_get(variables)), jax.tree.leaves(ref_variables)):
        np.testing.assert_array_equal(leaf, ref)
    for modality in ('audio', 'text'):
        np.testing.assert_allclose(out['embeddings'][modality], ref_out['embeddings'][modality], atol=1e-5)
    np.testing.assert_allclose(out['logit_scale'], ref_out['logit_scale'], rtol=1e-6)
    assert 'Involuntary full rematerialization' not in capfd.readouterr().err
