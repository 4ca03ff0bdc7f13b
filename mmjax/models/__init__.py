"""Model zoo: transformer layers, modality encoders, projection heads and the contrastive model."""

from mmjax.models.encoders import TextTransformer, ViT
from mmjax.models.heads import ProjectionHead
from mmjax.models.layers import Dense, Embed, Encoder, EncoderBlock, Mlp, MultiHeadAttention
from mmjax.models.model import ENCODERS, ContrastiveModel, Tower, build_model

__all__ = ['ContrastiveModel', 'Dense', 'ENCODERS', 'Embed', 'Encoder', 'EncoderBlock', 'Mlp', 'MultiHeadAttention',
           'ProjectionHead', 'TextTransformer', 'Tower', 'ViT', 'build_model']
