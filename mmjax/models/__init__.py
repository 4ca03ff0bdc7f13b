"""Model zoo: transformer layers, modality encoders, projection heads, fusion and the contrastive model."""

from mmjax.models.attention import MultiHeadAttention
from mmjax.models.audio import AudioTransformer
from mmjax.models.encoders import EncoderOptions, TextTransformer, ViT
from mmjax.models.fusion import (
    CoAttention,
    ConcatFusion,
    CrossAttention,
    CrossAttentionFusion,
    GatedCrossAttentionBlock,
    GatedFusion,
    GatedXAttnTextEncoder,
    WeightedSumFusion,
    build_fusion,
)
from mmjax.models.fusion_model import (
    ContrastiveItmMlmModel,
    FusionClassifier,
    ItmMlmHeads,
    build_fusion_classifier,
    build_itm_mlm_model,
)
from mmjax.models.heads import ProjectionHead
from mmjax.models.layers import Dense, Embed, Mlp
from mmjax.models.model import ENCODERS, ContrastiveModel, Tower, build_model
from mmjax.models.transformer import Encoder, EncoderBlock

__all__ = ['AudioTransformer', 'CoAttention', 'ConcatFusion', 'ContrastiveItmMlmModel', 'ContrastiveModel',
           'CrossAttention', 'CrossAttentionFusion', 'Dense', 'ENCODERS', 'Embed', 'Encoder', 'EncoderBlock',
           'EncoderOptions', 'FusionClassifier', 'GatedCrossAttentionBlock', 'GatedFusion', 'GatedXAttnTextEncoder',
           'ItmMlmHeads', 'Mlp', 'MultiHeadAttention', 'ProjectionHead', 'TextTransformer', 'Tower', 'ViT',
           'WeightedSumFusion', 'build_fusion', 'build_fusion_classifier', 'build_itm_mlm_model', 'build_model']
