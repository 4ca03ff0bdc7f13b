"""Model zoo: transformer layers, modality encoders, projection heads and the contrastive model."""

from mmjax.models.audio import AudioTransformer
from mmjax.models.encoders import TextTransformer, ViT
from mmjax.models.heads import ProjectionHead
from mmjax.models.layers import Dense, Embed, Encoder, EncoderBlock, Mlp, MultiHeadAttention
from mmjax.models.model import ENCODERS, ContrastiveModel, Tower, build_model

__all__ = ['AudioTransformer', 'ContrastiveModel', 'Dense', 'ENCODERS', 'Embed', 'Encoder', 'EncoderBlock', 'Mlp',
           'MultiHeadAttention', 'ProjectionHead', 'TextTransformer', 'Tower', 'ViT', 'build_model']

from mmjax.models.fusion import (CoAttention, ConcatFusion, CrossAttention, CrossAttentionFusion,  # noqa: E402
                                 GatedCrossAttentionBlock, GatedFusion, GatedXAttnTextEncoder, WeightedSumFusion,
                                 build_fusion)
from mmjax.models.fusion_model import (ContrastiveItmMlmModel, FusionClassifier, ItmMlmHeads,  # noqa: E402
                                       build_fusion_classifier, build_itm_mlm_model)

__all__ += ['CoAttention', 'ConcatFusion', 'ContrastiveItmMlmModel', 'CrossAttention', 'CrossAttentionFusion',
            'FusionClassifier', 'GatedCrossAttentionBlock', 'GatedFusion', 'GatedXAttnTextEncoder', 'ItmMlmHeads',
            'WeightedSumFusion', 'build_fusion', 'build_fusion_classifier', 'build_itm_mlm_model']
