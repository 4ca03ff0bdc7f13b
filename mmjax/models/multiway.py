"""Multiway transformer (BEiT-3): one stack of blocks whose self-attention is shared by every modality and whose
feed-forward network is one of three experts, chosen statically by position.

    MultiwayBlock:   x + attn(ln_attn(x), mask)               shared ('ln_attn', 'attn')
                     x + expert(x)                              'vision' | 'language' | 'vl' (LN + Mlp each)
    routing (mode):  'vision'    every position -> the vision expert (image-only input)
                     'language'  every position -> the language expert (text-only input)
                     'vl'        image-text input [image tokens; text tokens]: positions [0, split) -> vision,
                                 [split, L) -> language in the lower depth - vl_layers blocks; every position ->
                                 the vision-language expert 'vl' in the top `vl_layers` blocks (only those have it)

The routing slices the sequence, so an expert never sees (and gets exactly zero gradient from) the positions it
is not routed. `MultiwayModel` is the BEiT-3 model of task 'mdm': image and text embeddings in front of the
stack, the masked-image (VQ code) and masked-text heads behind it, the dual-encoder projections (`encode_image`,
`encode_text`: the vision-only and language-only paths) and the frozen image tokenizer whose codes are the
masked-image targets (`image_codes`: `mmjax.models.vq`'s encoder and quantizer, under the parameter names of a
task 'vq' workdir, 'encoder/...' and 'quantizer/embedding', so `init_from` loads them from one).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention
from mmjax.models.encoders import VOCAB_MULTIPLE, embed_text, patchify
from mmjax.models.heads import ProjectionHead, l2_normalize, logit_scale
from mmjax.models.layers import (
    ACT_POOLED,
    ACT_TOKENS,
    REMAT_POLICIES,
    Mlp,
    add_positions,
    constrain,
    dense,
    layer_norm,
    partitioned,
)
from mmjax.models.vq import VectorQuantizer, VQEncoder

Dtype = Any
MODES = ('vision', 'language', 'vl')
PARTS = ('image', 'text', 'pair')  # the three masked-data-modelling passes of `MultiwayModel.__call__`


class Expert(nn.Module):
    """One feed-forward expert: Mlp(ln(x)), [B,L,E] -> [B,L,E]. Params 'ln' (scale, bias ('embed',)) and
    'mlp/fc_in' ('embed', 'mlp'), 'mlp/fc_out' ('mlp', 'embed')."""
    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return Mlp(self.mlp_dim, self.activation, name='mlp', **kw)(layer_norm(name='ln', **kw)(x))


class MultiwayBlock(nn.Module):
    """Pre-LN block with shared self-attention and routed feed-forward experts (see the module docstring).
    `has_vl`: the block has the vision-language expert 'vl' (one of the top `vl_layers` blocks)."""
    num_heads: int
    mlp_dim: int
    has_vl: bool = False
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, mode: str, split: int = 0) -> jax.Array:
        """x [B,L,E], mask bool [B|1,1,L|1,L] or None (True = may attend), mode in `MODES`, split: the number of
        leading image positions (mode 'vl') -> [B,L,E]."""
        if mode not in MODES:
            raise ValueError(f'MultiwayBlock: mode must be one of {MODES}; got {mode!r}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ACT_TOKENS)
        x = x + MultiHeadAttention(self.num_heads, name='attn', **kw)(layer_norm(name='ln_attn', **kw)(x), mask=mask)
        expert = lambda name: Expert(self.mlp_dim, self.activation, name=name, **kw)  # noqa: E731
        if mode == 'vl' and self.has_vl:
            y = expert('vl')(x)
        elif mode == 'vl':
            if not 0 < split < x.shape[1]:
                raise ValueError(f'MultiwayBlock: split {split} must leave image and text positions in a '
                                 f'sequence of {x.shape[1]}')
            y = jnp.concatenate([expert('vision')(x[:, :split]), expert('language')(x[:, split:])], axis=1)
        else:
            y = expert(mode)(x)
        return constrain(x + y, ACT_TOKENS)


class MultiwayEncoder(nn.Module):
    """`depth` MultiwayBlocks ('block_{i}'), the top `vl_layers` with the vision-language expert. `remat`: 'none'
    | 'full' | 'dots' (jax.checkpoint per block, `layers.REMAT_POLICIES`)."""
    depth: int
    num_heads: int
    mlp_dim: int
    vl_layers: int
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, mode: str, split: int = 0) -> jax.Array:
        """x [B,L,E], mask as `MultiwayBlock`, mode in `MODES`, split (mode 'vl') -> [B,L,E]."""
        if not 0 <= self.vl_layers <= self.depth:
            raise ValueError(f'model.mdm.vl_layers must be in [0, depth={self.depth}]; got {self.vl_layers}')
        block_cls = MultiwayBlock
        if self.remat != 'none':
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"model.remat must be one of 'none', {sorted(REMAT_POLICIES)}; got {self.remat!r}")
            block_cls = nn.remat(MultiwayBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(3, 4))
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, i >= self.depth - self.vl_layers, self.activation,
                          self.dtype, self.param_dtype, name=f'block_{i}')(x, mask, mode, split)
        return x


class TextInput(nn.Module):
    """The text input of `encoders.embed_text` (token embeddings 'token_embed', positions 'pos_embed'),
    bidirectional with the key padding mask, pooled at position 0 (BOS)."""
    vocab_size: int
    max_len: int
    width: int
    vocab_multiple: int = VOCAB_MULTIPLE
    causal: bool = False
    pool: str = 'cls'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B,L] (pad 0) -> (x [B,L,width], key mask bool [B,1,1,L])."""
        x, mask, _ = embed_text(self, tokens, None)
        return x, mask


class MultiwayModel(nn.Module):
    """BEiT-3: image patches ('patch_embed', 'image_cls', 'image_pos', 'mask_token') and text ('text') embedded
    into one `MultiwayEncoder` ('multiway') with a shared final LN ('ln_final'), and
      - 'mim_head' ('embed', 'vocab'): logits over the tokenizer's `codebook_size` codes per image patch;
      - 'mlm_head' ('embed', 'vocab'): logits over the `vocab_size` text ids per text token;
      - 'image_proj', 'text_proj' (`ProjectionHead`, ('embed', 'joint')) and 'logit_scale': the dual encoder;
      - 'encoder', 'quantizer': the image tokenizer (`mmjax.models.vq`), meant to be loaded from a task 'vq'
        workdir and frozen; `image_codes` is its codes of an image, one per patch.
    The image sequence is [CLS, N patches] (N = (image_size / patch_size)^2), the text sequence the L tokens,
    the image-text sequence their concatenation (1 + N + L). `vq` holds VQAutoencoder's fields (widths,
    res_blocks, code_dim, codebook_size, codebook_init_norm) as sorted (key, value) pairs.
    """
    dual_encoder: ClassVar[bool] = True  # encode_image / encode_text: the dual-encoder evaluators apply
    image_size: int
    patch_size: int
    channels: int
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vl_layers: int
    embed_dim: int
    vq: tuple[tuple[str, Any], ...]
    logit_scale_init: float = 2.6592600369262695
    logit_scale_max: float | None = 4.605170249938965
    vocab_multiple: int = VOCAB_MULTIPLE
    remat: str = 'none'
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup_stack(self, mask_token: bool = True) -> dict[str, Any]:
        """Called in `setup`: the embeddings (with `mask_token`, the masked-patch token), the multiway stack and
        the final LN, what every path reads (all that `MultiwayClassifier` keeps, under these names), created in
        this order (each parameter's initial value depends on it). Returns the dtype keywords."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w, grid = self.width, self.image_size // self.patch_size
        init = partitioned(nn.initializers.normal(0.02), ('embed',))
        self.patch_embed = dense(w, ('patch', 'embed'), **kw)
        self.image_cls = self.param('image_cls', init, (w,), self.param_dtype)
        if mask_token:
            self.mask_token = self.param('mask_token', init, (w,), self.param_dtype)
        self.image_pos = self.param('image_pos', partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                                    (1 + grid * grid, w), self.param_dtype)
        self.text = TextInput(self.vocab_size, self.max_len, w, self.vocab_multiple, **kw)
        self.multiway = MultiwayEncoder(self.depth, self.num_heads, self.mlp_dim, self.vl_layers, self.remat,
                                        self.activation, **kw)
        self.ln_final = layer_norm(**kw)
        return kw

    def setup(self):
        kw = self.setup_stack()
        vq = dict(self.vq)
        self.mim_head = dense(int(vq['codebook_size']), ('embed', 'vocab'), **kw)
        self.mlm_head = dense(-(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple, ('embed', 'vocab'),
                              **kw)
        self.image_proj = ProjectionHead(self.embed_dim, **kw)
        self.text_proj = ProjectionHead(self.embed_dim, **kw)
        self.scale = logit_scale(self, self.logit_scale_init, self.logit_scale_max, self.param_dtype)
        self.encoder = VQEncoder(tuple(vq['widths']), int(vq['res_blocks']), int(vq['code_dim']))
        self.quantizer = VectorQuantizer(int(vq['codebook_size']), int(vq['code_dim']),
                                         float(vq['codebook_init_norm']))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def embed_image(self, images: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
        """images float [B,H,W,C], image_mask bool [B,N] | None (True: the patch is masked, its embedding
        replaced by 'mask_token') -> [B,1+N,width]: the class token, then the patches, plus positions."""
        if images.shape[1:] != (self.image_size, self.image_size, self.channels):
            raise ValueError(f'expected images [B,{self.image_size},{self.image_size},{self.channels}], '
                             f'got {images.shape}')
        x = self.patch_embed(patchify(images.astype(self.dtype), self.patch_size))
        if image_mask is not None:
            x = jnp.where(image_mask[..., None], self.mask_token.astype(self.dtype), x)
        cls = jnp.broadcast_to(self.image_cls.astype(self.dtype), (x.shape[0], 1, self.width))
        return constrain(add_positions(jnp.concatenate([cls, x], axis=1), self.image_pos.astype(self.dtype)),
                         ACT_TOKENS)

    def _encode(self, x: jax.Array, mask: jax.Array | None, mode: str, split: int = 0) -> jax.Array:
        return constrain(self.ln_final(self.multiway(x, mask, mode, split)), ACT_TOKENS)

    def vision(self, images: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
        """The vision-only path: images [B,H,W,C], image_mask bool [B,N] | None -> tokens [B,1+N,width]."""
        return self._encode(self.embed_image(images, image_mask), None, 'vision')

    def language(self, tokens: jax.Array) -> jax.Array:
        """The language-only path: tokens int32 [B,L] -> tokens [B,L,width] (pad keys masked)."""
        x, mask = self.text(tokens)
        return self._encode(x, mask, 'language')

    def fuse(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The vision-language path on image-text pairs: images [B,H,W,C], tokens int32 [B,L] ->
        (image tokens [B,1+N,width], text tokens [B,L,width]); every query sees every image token and the
        non-pad text tokens. Image positions 0 (CLS) and text position 0 (BOS) pool the pair."""
        image = self.embed_image(images)
        text, text_mask = self.text(tokens)
        split = image.shape[1]
        keys = jnp.concatenate([jnp.ones((tokens.shape[0], 1, 1, split), bool), text_mask], axis=-1)
        x = self._encode(jnp.concatenate([image, text], axis=1), keys, 'vl', split)
        return x[:, :split], x[:, split:]

    def image_codes(self, images: jax.Array) -> jax.Array:
        """The frozen tokenizer's codes: images [B,H,W,C] (normalised like its training data) -> int32 [B,N],
        one code per patch in row-major order. The tokenizer sees the images resized to grid * 2^(levels-1) per
        side, so that its code grid is the patch grid."""
        grid, levels = self.image_size // self.patch_size, len(dict(self.vq)['widths'])
        size = grid * 2 ** (levels - 1)
        images = jax.lax.stop_gradient(images.astype(jnp.float32))
        if size != self.image_size:
            images = jax.image.resize(images, (images.shape[0], size, size, self.channels), 'linear', antialias=True)
        codes = self.quantizer(self.encoder(images))['codes']
        return jax.lax.stop_gradient(codes.reshape(codes.shape[0], grid * grid))

    def mim_logits(self, image_tokens: jax.Array) -> jax.Array:
        """image tokens [B,1+N,width] -> float32 [B,N,codebook_size] (the CLS token dropped)."""
        return constrain(self.mim_head(image_tokens[:, 1:]).astype(jnp.float32), ('act_batch', 'act_length', None))

    def mlm_logits(self, text_tokens: jax.Array) -> jax.Array:
        """text tokens [B,L,width] -> float32 [B,L,vocab_size]."""
        logits = self.mlm_head(text_tokens)[..., :self.vocab_size]
        return constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', None))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Dual encoder, image side: images [B,H,W,C] -> unit-norm float32 [B,embed_dim] (vision-only path,
        class token, 'image_proj')."""
        return l2_normalize(self.image_proj(constrain(self.vision(images)[:, 0], ACT_POOLED)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Dual encoder, text side: tokens int32 [B,L] -> unit-norm float32 [B,embed_dim] (language-only path,
        BOS token, 'text_proj')."""
        return l2_normalize(self.text_proj(constrain(self.language(tokens)[:, 0], ACT_POOLED)))

    def __call__(self, batch: dict[str, jax.Array], train: bool = False,
                 parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
        """The masked-data-modelling passes `parts` (any of `PARTS`; all of them create every parameter).

        batch: 'image' float [B,H,W,C], 'text' int32 [B,L] (pad 0), and optionally 'image_mask' bool [B,N]
        (True = masked patch; default none), 'mlm_text' int32 [B,L] (the masked text of the text-only pass;
        default 'text'), 'pair_text' int32 [B,L] (the masked text of the image-text pass; default 'text').
        Returns {'logit_scale' float32 []} plus, per part:
          'image': 'mim_logits' float32 [B,N,codebook_size] (vision-only path on the masked image),
                   'embeddings'/'image' [B,D], and with 'image_mask' 'image_codes' int32 [B,N] (the tokenizer's
                   codes of the unmasked image);
          'text':  'mlm_logits' float32 [B,L,vocab_size] (language-only path), 'embeddings'/'text' [B,D];
          'pair':  'pair_logits' float32 [B,L,vocab_size] (vision-language path on the image and 'pair_text').
        The embeddings are unit-norm projections of the class / BOS token of the (masked) monomodal passes.
        """
        del train  # no dropout
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f'MultiwayModel: unknown parts {unknown}; choose from {PARTS}')
        out: dict[str, Any] = {'logit_scale': self.scale, 'embeddings': {}}
        if 'image' in parts:
            tokens = self.vision(batch['image'], batch.get('image_mask'))
            out['mim_logits'] = self.mim_logits(tokens)
            if 'image_mask' in batch or self.is_initializing():  # the targets of masked-image modelling
                out['image_codes'] = self.image_codes(batch['image'])
            out['embeddings']['image'] = l2_normalize(self.image_proj(constrain(tokens[:, 0], ACT_POOLED)))
        if 'text' in parts:
            tokens = self.language(batch.get('mlm_text', batch['text']))
            out['mlm_logits'] = self.mlm_logits(tokens)
            out['embeddings']['text'] = l2_normalize(self.text_proj(constrain(tokens[:, 0], ACT_POOLED)))
        if 'pair' in parts:
            out['pair_logits'] = self.mlm_logits(self.fuse(batch['image'], batch.get('pair_text', batch['text']))[1])
        return out


def stack_fields(model_cfg) -> dict[str, Any]:
    """`config.model` -> the fields `setup_stack` builds from, shared by `MultiwayModel` and `MultiwayClassifier`:
    the stack from `model.mdm` (width, depth, num_heads, mlp_dim, vl_layers), the image geometry from `model.image`
    (image_size, patch_size, channels), the text from `model.text` (vocab_size, max_len), remat, activation and
    dtypes."""
    d, img, txt = model_cfg.mdm, model_cfg.image, model_cfg.text
    return dict(
        image_size=int(img.image_size), patch_size=int(img.patch_size), channels=int(img.channels),
        vocab_size=int(txt.vocab_size), max_len=int(txt.max_len), width=int(d.width), depth=int(d.depth),
        num_heads=int(d.num_heads), mlp_dim=int(d.mlp_dim), vl_layers=int(d.vl_layers),
        remat=str(model_cfg.get('remat', 'none')), activation=str(model_cfg.get('activation', 'gelu') or 'gelu'),
        dtype=jnp.dtype(model_cfg.get('dtype', 'float32')), param_dtype=jnp.dtype(model_cfg.get('param_dtype', 'float32')))


def build_multiway_model(model_cfg) -> MultiwayModel:
    """`config.model` -> MultiwayModel: the stack as `stack_fields`, the tokenizer from `model.vq`, the dual
    encoder from `model.embed_dim` and `model.logit_scale_init` / `logit_scale_max`."""
    v, scale_max = model_cfg.vq, model_cfg.get('logit_scale_max', None)
    vq = dict(widths=tuple(int(w) for w in v.widths), res_blocks=int(v.res_blocks), code_dim=int(v.code_dim),
              codebook_size=int(v.codebook_size), codebook_init_norm=float(v.codebook_init_norm))
    return MultiwayModel(
        **stack_fields(model_cfg), embed_dim=int(model_cfg.embed_dim), vq=tuple(sorted(vq.items())),
        logit_scale_init=float(model_cfg.logit_scale_init),
        logit_scale_max=None if scale_max is None else float(scale_max))

