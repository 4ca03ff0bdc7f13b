"""Image preprocessing (shared by the training pipeline and inference) and training augmentation.

NumPy + PIL only, so it runs inside grain worker processes and needs no accelerator. The crop boxes of the
captioned pipeline (`random_crop_box`, `center_crop_box`) are chosen in the pixels of the image as stored, before
any pixel is decoded, so that `jpeg_denominator` can pick the smallest JPEG DCT scale that still gives the crop
its output size (mmjax/data/decode.py decodes at that scale and resizes once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

ImageLike = np.ndarray | Image.Image
Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right / bottom exclusive

# libjpeg(-turbo) decodes at 1/1, 1/2, 1/4 or 1/8 of the stored size; PIL's Image.draft exposes these.
JPEG_DENOMINATORS = (8, 4, 2, 1)

# ITU-R 601 luma weights for RGB -> gray.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _to_float_hwc(image: ImageLike) -> np.ndarray:
    """One image (uint8 [H,W] / [H,W,C], float in [0,1], or PIL) -> float32 [H,W,C] in [0,1], C in {1,3}."""
    if isinstance(image, Image.Image):
        if image.mode not in ('L', 'RGB'):
            image = image.convert('RGB')
        image = np.asarray(image)
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    else:
        raise TypeError(f'images must be uint8 (or float in [0, 1]), got dtype {image.dtype}')
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f'an image must be [H,W] or [H,W,C] with C in (1, 3, 4), got shape {image.shape}')
    return image[..., :3]  # drop alpha


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """float32 [H,W,C] -> [size,size,C]: bicubic resize of the shorter side to `size`, then center crop."""
    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    channels = []
    for k in range(c):
        resized = Image.fromarray(image[..., k], mode='F').resize((new_w, new_h), Image.BICUBIC)
        channels.append(np.asarray(resized)[top:top + size, left:left + size])
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def _convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """float32 [..., C] -> [..., channels] (gray <-> RGB)."""
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        return (image @ _LUMA)[..., None]
    raise ValueError(f'cannot convert {c}-channel images to {channels} channels')


def _per_channel(value, channels: int, name: str) -> np.ndarray:
    value = np.asarray(value, np.float32).reshape(-1)
    if value.size == 1:
        return np.full((channels,), value[0], np.float32)
    if value.size != channels:
        raise ValueError(f'{name} has {value.size} entries, expected 1 or {channels} (one per channel)')
    return value


def preprocess_images(images: np.ndarray | Sequence[ImageLike], image_size: int, channels: int,
                      mean=0.5, std=0.5) -> np.ndarray:
    """Model-ready images.

    Args:
      images: uint8 [N,H,W] or [N,H,W,C] (C in 1, 3, 4), or a sequence of images of any sizes
        (uint8 arrays, float arrays in [0, 1], or PIL images).
      image_size: output height and width; non-square inputs are resized on the shorter side and
        center-cropped.
      channels: 1 or 3; gray inputs are repeated to RGB, RGB inputs are converted to luma.
      mean, std: scalar or one value per output channel, applied after scaling to [0, 1].
    Returns:
      float32 [N, image_size, image_size, channels].
    """
    if channels not in (1, 3):
        raise ValueError(f'channels must be 1 or 3, got {channels}')
    mean = _per_channel(mean, channels, 'image_mean')
    std = _per_channel(std, channels, 'image_std')
    if np.any(std <= 0):
        raise ValueError(f'image_std must be positive, got {std}')
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
        raise ValueError(f'images must be [N,H,W] or [N,H,W,C], got shape {images.shape}')
    if (isinstance(images, np.ndarray) and images.dtype == np.uint8
            and images.shape[1:3] == (image_size, image_size)):
        # Fast path (the training pipeline): already the right size, only channels and scaling change.
        x = images.astype(np.float32) * np.float32(1.0 / 255.0)
        out = _convert_channels(x[..., None] if x.ndim == 3 else x[..., :3], channels)
    else:
        out = np.empty((len(images), image_size, image_size, channels), np.float32)
        for i, image in enumerate(images):
            out[i] = _convert_channels(_resize_center_crop(_to_float_hwc(image), image_size), channels)
    return (out - mean) / std


def random_affine(image: np.ndarray, rng: np.random.Generator, max_translate: float = 0.1,
                  scale_range: tuple[float, float] = (0.9, 1.1), max_rotate_deg: float = 0.0) -> np.ndarray:
    """Light training augmentation: random scale, rotation and translation about the image center.

    Args:
      image: uint8 [H,W] or [H,W,C].
      rng: the generator that makes the draw (deterministic under grain's per-record rng).
      max_translate: largest shift as a fraction of the image side (uniform in +-max_translate).
      scale_range: zoom factor drawn uniformly from this range.
      max_rotate_deg: largest rotation in degrees (uniform in +-max_rotate_deg).
    Returns:
      uint8 array of the same shape; uncovered pixels are 0 (the digits' background).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f'random_affine expects uint8, got {image.dtype}')
    h, w = image.shape[:2]
    scale = rng.uniform(*scale_range)
    angle = np.deg2rad(rng.uniform(-max_rotate_deg, max_rotate_deg))
    tx, ty = rng.uniform(-max_translate, max_translate, size=2) * (w, h)
    # PIL's AFFINE maps output pixel (x, y) to input (a x + b y + c, d x + e y + f): give it the inverse.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., k]), mode='L').transform(
            (w, h), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR, fillcolor=0))
        for k in range(planes.shape[-1])], axis=-1)
    return out[..., 0] if image.ndim == 2 else out


def random_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Inception-style crop box of a width x height image: area fraction ~ U(scale), log aspect ~ U(log ratio).

    Up to 10 tries of two draws each (area, aspect), plus two integer draws (top, left) for the first box that
    fits; after 10 rejected tries, the central max-square box with no further draw (as torchvision does). The
    draws and so the box depend only on (width, height, rng state), never on how the pixels are decoded.
    Returns (left, top, right, bottom), 0 <= left < right <= width, 0 <= top < bottom <= height.
    """
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    return center_crop_box(width, height)


def center_crop_box(width: int, height: int) -> Box:
    """The central max-square box (side min(width, height)) of a width x height image (evaluation crop)."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def jpeg_denominator(box: Box, size: int) -> int:
    """Largest d in (8, 4, 2, 1) with both sides of `box` >= size * d: decoding the JPEG at 1/d of its size
    still gives the crop at least `size` pixels each way, so resizing it to [size, size] downsamples (or
    upsamples no more than a full decode would: d = 1 for crops already smaller than `size`)."""
    width, height = box[2] - box[0], box[3] - box[1]
    for d in JPEG_DENOMINATORS:
        if width >= size * d and height >= size * d:
            return d
    return 1


def resize_box(image: Image.Image, box: Sequence[float], size: int, denominator: int = 1) -> Image.Image:
    """PIL image decoded at 1/denominator of its stored size -> [size, size] bicubic resize of `box` (given in
    stored-size pixels; mapped to x / denominator, since a DCT-scaled pixel i covers stored pixels
    [i*d, (i+1)*d)). One resampling pass that reads only the box's neighbourhood."""
    scaled = tuple(v / denominator for v in box) if denominator != 1 else tuple(box)
    return image.resize((size, size), Image.BICUBIC, box=scaled)
