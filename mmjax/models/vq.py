"""Image tokenizer: a convolutional VQ autoencoder with an L2-normalised (cosine) codebook.

    images [B, H, W, C] -> VQEncoder -> z [B, h, w, D] -> VectorQuantizer -> codes int32 [B, h, w]
                                                   (h = H / 2^(len(widths) - 1))
    codes -> codebook rows [B, h, w, D] -> VQDecoder -> images [B, H, W, C]

Encoder: a 3x3 conv to widths[0], then per level `res_blocks` residual blocks and (between levels) a stride-2
4x4 conv to the next width; GroupNorm, SiLU and a projection to the code dimension D (factorised codes: a low D
keeps a codebook well used). The decoder mirrors it with nearest-neighbour 2x upsampling + 3x3 convs.
The lookup is cosine: both the latents and the codebook rows are L2-normalised, the code of a latent is the row of
largest dot product (= smallest Euclidean distance on the unit sphere), and the decoder gets the straight-through
estimate z + stop_gradient(code - z), so the reconstruction gradient reaches the encoder unchanged.

Parameters carry logical axes like the rest of `mmjax.models`: conv kernels (None, None, 'channels', 'embed')
[kh, kw, C_in, C_out] (the image-side conv of the decoder ('embed', 'channels') on its inputs), norms and
biases ('embed',), the projections ('embed', 'joint') and ('joint', 'embed'), the codebook ('vocab', 'joint')
[K, D].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import default_kernel_init, dense, partitioned

Dtype = Any
KERNEL_NAMES = (None, None, "channels", "embed")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x [..., D] -> x / max(|x|, eps) along the last axis, same shape."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def conv(features: int, kernel: int, stride: int = 1, names=KERNEL_NAMES, name: str | None = None,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Conv:
    """A 'SAME'-padded (for stride 2 and an even kernel: output H/2) conv with logical axes `names` on its
    kernel [kernel, kernel, C_in, features] and `names[-1]` on its bias [features]."""
    pad = "SAME" if stride == 1 else ((kernel // 2 - 1, kernel // 2), (kernel // 2 - 1, kernel // 2))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=param_dtype, kernel_init=partitioned(default_kernel_init, names),
                   bias_init=partitioned(nn.initializers.zeros_init(), names[-1:]), name=name)


def group_norm(channels: int, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm over [B, H, W, channels] with gcd(8, channels) groups and ('embed',) scale and bias."""
    return nn.GroupNorm(num_groups=math.gcd(8, channels), epsilon=1e-6, name=name,
                        scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
                        bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)))


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))): [B, H, W, C_in] -> [B, H, W, features]; a 1x1 conv maps the
    shortcut when C_in != features. The second conv starts at zero, so the block is the shortcut at init."""
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = conv(self.features, 3, name="conv1")(nn.silu(group_norm(x.shape[-1], name="norm1")(x)))
        h = nn.silu(group_norm(self.features, name="norm2")(h))
        h = nn.Conv(self.features, (3, 3), padding="SAME", name="conv2",
                    kernel_init=partitioned(nn.initializers.zeros_init(), KERNEL_NAMES),
                    bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)))(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, name="shortcut")(x)
        return x + h


class VQEncoder(nn.Module):
    """images [B, H, W, C] -> latents [B, H / 2^(L-1), W / 2^(L-1), code_dim] (L = len(widths)), not normalised."""
    widths: tuple[int, ...]
    res_blocks: int
    code_dim: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = conv(self.widths[0], 3, name="conv_in")(images.astype(jnp.float32))
        for level, width in enumerate(self.widths):
            for i in range(self.res_blocks):
                x = ResBlock(width, name=f"level{level}_res{i}")(x)
            if level + 1 < len(self.widths):
                x = conv(self.widths[level + 1], 4, stride=2, name=f"down{level}")(x)
        x = nn.silu(group_norm(x.shape[-1], name="norm_out")(x))
        return dense(self.code_dim, ("embed", "joint"), name="to_code")(x)


class VQDecoder(nn.Module):
    """code vectors [B, h, w, D] -> images [B, h * 2^(L-1), w * 2^(L-1), channels] (L = len(widths))."""
    widths: tuple[int, ...]
    res_blocks: int
    channels: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = dense(self.widths[-1], ("joint", "embed"), name="from_code")(z)
        for level in reversed(range(len(self.widths))):
            for i in range(self.res_blocks):
                x = ResBlock(self.widths[level], name=f"level{level}_res{i}")(x)
            if level > 0:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
                x = conv(self.widths[level - 1], 3, name=f"up{level}")(x)
        x = nn.silu(group_norm(x.shape[-1], name="norm_out")(x))
        return conv(self.channels, 3, names=(None, None, "embed", "channels"), name="conv_out")(x)


class VectorQuantizer(nn.Module):
    """Cosine nearest-code lookup in a [codebook_size, code_dim] codebook ('quantizer/embedding', unnormalised
    N(0, 1) rows; the lookup normalises them)."""
    codebook_size: int
    code_dim: int

    init_norm: float = 1.0

    def setup(self):
        def init(key, shape, dtype=jnp.float32):  # random directions, rows of norm init_norm
            return (self.init_norm * l2_normalize(jax.random.normal(key, shape, jnp.float32))).astype(dtype)

        self.embedding = self.param("embedding", partitioned(init, ("vocab", "joint")),
                                    (self.codebook_size, self.code_dim), jnp.float32)

    def codebook(self) -> jax.Array:
        """The L2-normalised codebook [K, D]."""
        return l2_normalize(self.embedding)

    def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
        """z [..., D] -> {'codes' int32 [...], 'z' [..., D] normalised latents, 'quantized' [..., D] their codes'
        normalised rows (no gradient to z), 'straight_through' [..., D] = z + stop_gradient(quantized - z),
        'codebook' [K, D] normalised}."""
        book = self.codebook()
        z = l2_normalize(z.astype(jnp.float32))
        codes = jnp.argmax(jnp.einsum("...d,kd->...k", z, book), axis=-1).astype(jnp.int32)
        quantized = jnp.take(book, codes, axis=0)
        return {"codes": codes, "z": z, "quantized": quantized,
                "straight_through": z + jax.lax.stop_gradient(quantized - z), "codebook": book}

    def lookup(self, codes: jax.Array) -> jax.Array:
        """codes int [...] -> normalised code vectors [..., D]."""
        return jnp.take(self.codebook(), codes, axis=0)


class VQAutoencoder(nn.Module):
    """The image tokenizer. `__call__(batch)` reconstructs batch['image'] through the codes; `encode` and
    `decode` map images [B, H, W, C] <-> codes int32 [B, h, w] (h = H / 2^(len(widths) - 1))."""
    widths: tuple[int, ...] = (32, 64)
    res_blocks: int = 1
    code_dim: int = 8
    codebook_size: int = 128
    codebook_init_norm: float = 1.0
    channels: int = 3

    def setup(self):
        self.encoder = VQEncoder(tuple(self.widths), self.res_blocks, self.code_dim)
        self.quantizer = VectorQuantizer(self.codebook_size, self.code_dim, self.codebook_init_norm)
        self.decoder = VQDecoder(tuple(self.widths), self.res_blocks, self.channels)

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
        """batch['image'] [B, H, W, C] -> the quantizer's outputs (see `VectorQuantizer.__call__`, latents
        [B, h, w, D]) and 'reconstruction' [B, H, W, C], decoded from the straight-through codes."""
        del train  # no dropout or batch statistics
        out = self.quantizer(self.encoder(batch["image"]))
        return dict(out, reconstruction=self.decoder(out["straight_through"]))

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] (normalised like the training data) -> codes int32 [B, h, w]."""
        return self.quantizer(self.encoder(images))["codes"]

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes int [B, h, w] -> images [B, H, W, C] (normalised like the training data)."""
        return self.decoder(self.quantizer.lookup(codes))

    def reconstruct(self, images: jax.Array) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> {'reconstruction' [B, H, W, C], 'codes' int32 [B, h, w]}."""
        out = self(dict(image=images))
        return {"reconstruction": out["reconstruction"], "codes": out["codes"]}


def build_vq_model(model_config) -> VQAutoencoder:
    """The VQAutoencoder of `model_config.vq` (config.model.vq) for images of `model_config.image.channels`."""
    v = model_config.vq
    return VQAutoencoder(widths=tuple(int(w) for w in v.widths), res_blocks=int(v.res_blocks),
                         code_dim=int(v.code_dim), codebook_size=int(v.codebook_size),
                         codebook_init_norm=float(v.codebook_init_norm), channels=int(model_config.image.channels))


def code_grid(model_config) -> int:
    """Codes per side of the grid the tokenizer of `model_config` (config.model) makes: image_size / 2^(levels-1)."""
    return int(model_config.image.image_size) // 2 ** (len(model_config.vq.widths) - 1)


def vq_flops_per_example(model_config) -> float:
    """Training FLOPs of one image of `model_config` (config.model): 3 x the forward's 2 x multiply-adds of the
    convs, the projections and the lookup (norms and activations left out)."""
    v, size = model_config.vq, int(model_config.image.image_size)
    widths, blocks, d, k = [int(w) for w in v.widths], int(v.res_blocks), int(v.code_dim), int(v.codebook_size)
    c_img = int(model_config.image.channels)
    macs, side = 9 * c_img * widths[0] * size * size * 2, size  # conv_in and conv_out
    for level, width in enumerate(widths):
        macs += 2 * blocks * 2 * 9 * width * width * side * side  # encoder + decoder res blocks, 2 convs each
        if level + 1 < len(widths):
            side //= 2
            macs += 16 * width * widths[level + 1] * side * side  # down conv
            macs += 9 * widths[level + 1] * width * (2 * side) ** 2  # up conv
    macs += side * side * (2 * widths[-1] * d + k * d)  # projections and the lookup
    return 3.0 * 2.0 * macs
