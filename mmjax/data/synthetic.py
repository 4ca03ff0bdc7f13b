"""Synthetic captioned photos in the three builder formats, for tests, the loader benchmark and the README.

Each image is a smooth two-colour gradient with a filled shape and mild noise, of a random size
(`min_side`..`max_side` per side), saved as JPEG (or PNG / WebP); its caption names the colours and shape,
e.g. 'a red circle on a blue to green background'. Deterministic from the seed.

    python -m mmjax.data.synthetic --format webdataset --out /tmp/pairs --num 400 --per-shard 100
    python -m mmjax.data.synthetic --format csv --out /tmp/pairs_csv --num 50
    python -m mmjax.data.synthetic --format coco --out /tmp/pairs_coco --num 50

Each writes its files plus `spec.json` (a builder spec, paths relative to it) into --out, ready for
`--config.data.name=spec --config.data.spec=<out>/spec.json`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mmjax import storage

COLOURS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 70, 220), 'yellow': (240, 220, 40),
           'white': (245, 245, 245), 'black': (15, 15, 15), 'purple': (140, 50, 170), 'orange': (250, 140, 30)}
SHAPES = ('circle', 'square', 'triangle')
PIL_FORMATS = {'jpg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}


def photo(rng: np.random.Generator, min_side: int = 160, max_side: int = 640, ext: str = 'jpg'
          ) -> tuple[bytes, str]:
    """(encoded image bytes, caption) of one random synthetic photo."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    names = list(COLOURS)
    top, bottom, fill = (names[i] for i in rng.choice(len(names), 3, replace=False))
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = (1 - t) * np.float32(COLOURS[top]) + t * np.float32(COLOURS[bottom])
    pixels = np.broadcast_to(pixels, (height, width, 3)) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    side = int(min(width, height) * rng.uniform(0.3, 0.7))
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    draw = ImageDraw.Draw(image)
    if shape == 'circle':
        draw.ellipse((x0, y0, x0 + side, y0 + side), fill=COLOURS[fill])
    elif shape == 'square':
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=COLOURS[fill])
    else:
        draw.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=COLOURS[fill])
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[ext], **({'quality': 90} if ext == 'jpg' else {}))
    return buffer.getvalue(), f'a {fill} {shape} on a {top} to {bottom} background'


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(out: str, num: int, per_shard: int = 100, seed: int = 0, prefix: str = '',
                     caption_prefix: str = '', **photo_kwargs) -> list[str]:
    """img2dataset-style shards out/{prefix}00000.tar ... with {key}.jpg, {key}.txt, {key}.json. Returns paths."""
    storage.makedirs(out)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(-(-num // per_shard)):
        path = storage.join(out, f'{prefix}{shard:05d}.tar')
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode='w') as tar:
            for i in range(shard * per_shard, min(num, (shard + 1) * per_shard)):
                data, caption = photo(rng, **photo_kwargs)
                key = f'{shard:05d}{i:04d}'
                _add(tar, f'{key}.jpg', data)
                _add(tar, f'{key}.txt', (caption_prefix + caption).encode())
                _add(tar, f'{key}.json', json.dumps({'key': key, 'caption': caption}).encode())
        storage.write_bytes_atomic(path, buffer.getvalue())
        paths.append(path)
    return paths


def write_images(folder: str, num: int, seed: int, **photo_kwargs) -> list[tuple[str, str]]:
    """num JPEGs in folder/; returns (file name, caption) pairs."""
    storage.makedirs(folder)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        data, caption = photo(rng, **photo_kwargs)
        name = f'{i:06d}.jpg'
        storage.write_bytes_atomic(storage.join(folder, name), data)
        out.append((name, caption))
    return out


def write_csv(out: str, num: int, seed: int = 0, **photo_kwargs) -> str:
    """out/images/*.jpg and out/pairs.csv (columns filepath, caption; paths relative to the CSV)."""
    pairs = write_images(storage.join(out, 'images'), num, seed, **photo_kwargs)
    path = storage.join(out, 'pairs.csv')
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    writer.writerow(['filepath', 'caption'])
    writer.writerows((f'images/{name}', caption) for name, caption in pairs)
    storage.write_text_atomic(path, text.getvalue())
    return path


def write_coco(out: str, num: int, seed: int = 0, **photo_kwargs) -> str:
    """out/images/*.jpg and out/captions.json (COCO captions: 2 captions per image)."""
    pairs = write_images(storage.join(out, 'images'), num, seed, **photo_kwargs)
    images = [{'id': i, 'file_name': f'images/{name}'} for i, (name, _) in enumerate(pairs)]
    annotations = []
    for i, (_, caption) in enumerate(pairs):
        annotations.append({'id': 2 * i, 'image_id': i, 'caption': caption})
        annotations.append({'id': 2 * i + 1, 'image_id': i, 'caption': 'a picture of ' + caption[2:]})
    path = storage.join(out, 'captions.json')
    storage.write_text_atomic(path, json.dumps({'images': images, 'annotations': annotations}))
    return path


def write_spec(out: str, name: str, fmt: str, paths: str) -> str:
    path = storage.join(out, 'spec.json')
    storage.write_text_atomic(path, json.dumps({'name': name, 'format': fmt, 'paths': paths}, indent=1))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--format', choices=('webdataset', 'csv', 'coco'), required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--num', type=int, default=400)
    parser.add_argument('--per-shard', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--name', default='', help='dataset name in spec.json (default synthetic_<format>)')
    parser.add_argument('--min-side', type=int, default=160)
    parser.add_argument('--max-side', type=int, default=640)
    args = parser.parse_args(argv)
    sizes = dict(min_side=args.min_side, max_side=args.max_side)
    name = args.name or f'synthetic_{args.format}'
    if args.format == 'webdataset':
        write_webdataset(args.out, args.num, args.per_shard, args.seed, **sizes)
        spec = write_spec(args.out, name, 'webdataset', '*.tar')
    elif args.format == 'csv':
        write_csv(args.out, args.num, args.seed, **sizes)
        spec = write_spec(args.out, name, 'csv', 'pairs.csv')
    else:
        write_coco(args.out, args.num, args.seed, **sizes)
        spec = write_spec(args.out, name, 'coco', 'captions.json')
    print(f'wrote {args.num} {args.format} samples to {args.out}; spec: {spec}')


if __name__ == '__main__':
    main()
