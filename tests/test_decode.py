"""The robust decode stage: each bad kind detected and counted, fuzzing never crashes, crop/normalise shapes."""

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmjax.data import decode
from mmjax.data.decode import BadDataError, BadSample, DecodeLimits, DecodeStats


def encoded(fmt, size=(48, 32), mode='RGB', seed=0, **kwargs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def kind_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except BadSample as bad:
        return bad.kind
    return 'ok'


@pytest.mark.parametrize('fmt,mode', [('JPEG', 'RGB'), ('JPEG', 'L'), ('JPEG', 'CMYK'), ('PNG', 'RGBA'),
                                      ('PNG', 'P'), ('PNG', 'L'), ('WEBP', 'RGB'), ('GIF', 'P'), ('BMP', 'RGB')])
def test_decodes_every_mode_to_rgb_uint8(fmt, mode):
    image = decode.decode_image(encoded(fmt, mode=mode))
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8


def test_sixteen_bit_png_keeps_the_high_byte():
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 5), 0x9C40, np.uint16)).save(buffer, format='PNG')
    image = decode.decode_image(buffer.getvalue())
    assert image.shape == (6, 5, 3) and (image == 0x9C).all()


def test_png_round_trip_is_exact():
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    np.testing.assert_array_equal(decode.decode_image(buffer.getvalue()), pixels)


def test_each_bad_image_kind():
    limits = DecodeLimits(max_pixels=100_000, min_side=4)
    jpeg = encoded('JPEG', size=(200, 150))
    assert kind_of(decode.decode_image, b'', limits) == 'empty_image'
    assert kind_of(decode.decode_image, b'not an image at all', limits) == 'bad_image'
    assert kind_of(decode.decode_image, jpeg[: len(jpeg) // 2], limits) == 'bad_image'  # truncated
    assert kind_of(decode.decode_image, encoded('PNG', size=(2, 50)), limits) == 'tiny_image'
    assert kind_of(decode.decode_image, jpeg, limits) == 'ok'


def test_bomb_rejected_from_header_without_decoding(monkeypatch):
    buffer = io.BytesIO()
    Image.new('1', (4000, 4000)).save(buffer, format='PNG')  # 16 M pixels in a ~2 KB file
    bomb = buffer.getvalue()
    assert len(bomb) < 10_000

    def fail_load(self, *args, **kwargs):
        raise AssertionError('pixels were decoded')

    monkeypatch.setattr(ImageFile.ImageFile, 'load', fail_load)
    assert kind_of(decode.decode_image, bomb, DecodeLimits(max_pixels=1_000_000)) == 'too_many_pixels'


def test_pil_bomb_error_is_counted_too(monkeypatch):
    # Above 2 x PIL's own MAX_IMAGE_PIXELS, Image.open itself raises DecompressionBombError.
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    assert kind_of(decode.decode_image, encoded('PNG', size=(100, 100)),
                   DecodeLimits(max_pixels=10**9)) == 'too_many_pixels'


def test_caption_kinds():
    limits = DecodeLimits(max_caption_chars=20)
    assert decode.clean_caption('  a  photo\n of\ta cat ', limits) == 'a photo of a cat'
    assert decode.clean_caption('café'.encode(), limits) == 'café'
    assert kind_of(decode.clean_caption, '   \n', limits) == 'empty_caption'
    assert kind_of(decode.clean_caption, None, limits) == 'empty_caption'
    assert kind_of(decode.clean_caption, b'\xc3\x28 bad', limits) == 'bad_caption'
    assert kind_of(decode.clean_caption, 'nul\x00byte', limits) == 'bad_caption'
    assert kind_of(decode.clean_caption, 'x' * 21, limits) == 'long_caption'
    # check_sample keeps the good captions of a sample and fails only when none is left
    jpeg = encoded('JPEG')
    assert decode.check_sample(jpeg, ['', 'good one', b'\xff'], limits) == ['good one']
    assert kind_of(decode.check_sample, jpeg, ['', b'\xff'], limits) == 'empty_caption'
    assert kind_of(decode.check_sample, jpeg, [], limits) == 'empty_caption'


def test_missing_file(tmp_path):
    assert kind_of(decode.read_file, str(tmp_path / 'nope.jpg')) == 'missing_file'
    assert kind_of(decode.read_file, str(tmp_path)) == 'missing_file'  # a folder


def test_stats_fraction_and_metrics():
    limits = DecodeLimits(max_bad_fraction=0.25, min_samples_for_fraction=8)
    stats = DecodeStats()
    for _ in range(5):
        stats.ok()
    for kind in ('bad_image', 'bad_image', 'missing_file'):
        stats.bad(kind)
    stats.check('shard-7.tar', DecodeLimits(max_bad_fraction=0.4), final=True)  # 3/8 <= 0.4
    stats.check('shard-7.tar', limits)  # 3/8 > 0.25 but the file is not over: judged at its end
    stats.check('shard-7.tar', limits, total=12)  # 3 bad of 12 can still end at 0.25
    with pytest.raises(BadDataError, match='shard-7.tar: 3/8 samples bad'):
        stats.check('shard-7.tar', limits, final=True)  # 3/8 > 0.25 at the end of the file
    with pytest.raises(BadDataError, match=r'shard-7.tar: 3 bad samples in the first 8 of its 11.*stopped early'):
        stats.check('shard-7.tar', limits, total=11)  # 3/11 > 0.25 whatever the last 3 hold
    small = DecodeStats()
    small.bad('bad_image')
    small.ok()
    small.check('early', limits)  # not the end of the file: not judged yet
    with pytest.raises(BadDataError, match='early'):
        small.check('early', limits, final=True)
    all_bad = DecodeStats()
    all_bad.bad('empty_image')
    with pytest.raises(BadDataError, match='all 1 samples are bad'):
        all_bad.check('f.csv', DecodeLimits(max_bad_fraction=1.0), final=True)
    total = stats + small
    metrics = total.metrics()
    assert metrics['data/seen'] == 10 and metrics['data/kept'] == 6
    assert metrics['data/skipped_bad_image'] == 3 and metrics['data/skipped_long_caption'] == 0
    assert DecodeStats.from_dict(total.to_dict()).to_dict() == total.to_dict()
    with pytest.raises(ValueError, match='unknown bad-sample kind'):
        stats.bad('weird')


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    op = rng.integers(6)
    if op == 0:  # truncate
        return bytes(data[: rng.integers(0, len(data))])
    if op == 1:  # flip random bytes, header included
        for _ in range(rng.integers(1, 20)):
            data[rng.integers(len(data))] = rng.integers(256)
    elif op == 2:  # flip bytes only in the first 64 (header fields: sizes, chunk lengths)
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(min(64, len(data)))] = rng.integers(256)
    elif op == 3:  # splice random junk in
        at = rng.integers(len(data))
        data[at:at] = rng.integers(0, 256, rng.integers(1, 200), dtype=np.uint8).tobytes()
    elif op == 4:  # zero a block
        at = rng.integers(len(data))
        data[at: at + rng.integers(1, 500)] = b'\x00' * len(data[at: at + 500])
    else:  # pure noise with a real magic number
        magic = bytes(data[:8])
        return magic + rng.integers(0, 256, rng.integers(0, 2000), dtype=np.uint8).tobytes()
    return bytes(data)


def test_fuzz_corrupted_images_never_crash_and_all_counted():
    rng = np.random.default_rng(1234)
    originals = [encoded(fmt, size=(int(rng.integers(8, 64)), int(rng.integers(8, 64))), seed=i, mode=mode)
                 for i, (fmt, mode) in enumerate([('JPEG', 'RGB'), ('JPEG', 'L'), ('PNG', 'RGB'), ('PNG', 'P'),
                                                  ('WEBP', 'RGB'), ('GIF', 'P'), ('BMP', 'RGB'),
                                                  ('TIFF', 'RGB')])]
    originals.append(encoded('JPEG', size=(40, 40), progressive=True))
    limits = DecodeLimits(max_pixels=4_000_000)
    stats = DecodeStats()
    n = 1200
    start = time.perf_counter()
    for i in range(n):
        data = _mutate(originals[i % len(originals)], rng)
        try:
            image = decode.decode_image(data, limits)
        except BadSample as bad:
            stats.bad(bad.kind)
        else:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
            assert image.shape[0] * image.shape[1] <= limits.max_pixels
            stats.ok()
    assert stats.seen == n and stats.kept + stats.num_bad == n
    assert stats.skipped['bad_image'] > n // 4  # the corruption was real
    assert set(stats.skipped) <= set(decode.BAD_KINDS)
    assert time.perf_counter() - start < 60


def test_random_resized_crop_and_normalize():
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    crops = [decode.random_resized_crop(image, rng, 32) for _ in range(20)]
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 20  # random
    again = [decode.random_resized_crop(image, np.random.default_rng(0), 32)]
    np.testing.assert_array_equal(again[0], crops[0])  # deterministic given the rng
    # scale=(1,1), ratio=(1,1) on a square image = the whole image; the flip mirrors it
    square = image[:90]
    full = decode.random_resized_crop(square, np.random.default_rng(0), 90, scale=(1, 1), ratio=(1, 1),
                                      flip=False)
    np.testing.assert_array_equal(full, square)
    flips = {decode.random_resized_crop(square, np.random.default_rng(s), 90, scale=(1, 1), ratio=(1, 1))
             .tobytes() for s in range(10)}
    assert flips == {square.tobytes(), square[:, ::-1].tobytes()}
    gray = decode.random_resized_crop(image[..., :1], rng, 16)
    assert gray.shape == (16, 16, 1)
    out = decode.normalize(np.full((2, 2, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    np.testing.assert_allclose(out[0, 0], [2.0, 1.0, 0.5])
    assert out.dtype == np.float32


def test_draft_decode_keeps_at_least_the_requested_size():
    jpeg = encoded('JPEG', size=(800, 600))
    small = decode.decode_image(jpeg, draft_size=224)
    assert small.shape[0] >= 224 and small.shape[1] >= 224 and small.shape[0] < 600
