"""Data: tokenizers, image preprocessing, the embedded digits dataset and the grain pipeline."""

from mmjax.data.image import preprocess_images, random_affine
from mmjax.data.pipeline import load_eval_split, make_train_loader, zeroshot_prompts
from mmjax.data.tokenizers import ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    'ByteTokenizer', 'Tokenizer', 'get_tokenizer', 'load_eval_split', 'make_train_loader',
    'preprocess_images', 'random_affine', 'zeroshot_prompts',
]
