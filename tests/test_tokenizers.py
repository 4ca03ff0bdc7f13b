"""SentencePiece, HF tokenizers and CLIP BPE behind the Tokenizer interface, trained on tiny caption sets."""

import gzip

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.data import bpe
from mmjax.data.subword import HFTokenizer, SentencePieceTokenizer, check_embedding_vocab
from mmjax.data.tokenizers import BOS_ID, EOT_ID, PAD_ID, get_tokenizer

WORDS = ['a', 'photo', 'of', 'the', 'cat', 'dog', 'sitting', 'on', 'red', 'blue', 'sofa', 'street', 'at',
         'night', 'two', 'people', 'walking', 'beach', 'with', 'small', 'large', 'green', 'tree', 'car']


def captions(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, rng.integers(3, 10))) for _ in range(n)] + [
        'a photo of 2 cats, sitting!', 'the café at night', 'numbers 12345 and words']


def check_interface(tok, texts, expect):
    """encode -> [N, max_len] int32 with BOS first, EOT last non-pad, pads 0; decode inverts `expect`."""
    tokens = tok.encode(texts)
    assert tokens.shape == (len(texts), tok.max_len) and tokens.dtype == np.int32
    assert (tokens[:, 0] == BOS_ID).all() and tokens.max() < tok.vocab_size and tokens.min() >= 0
    for row in tokens:
        content = row[row != PAD_ID]
        assert content[-1] == EOT_ID and (row[len(content):] == PAD_ID).all()
        assert (content[1:-1] > EOT_ID).all()  # no specials inside the content
    assert tok.decode(tokens) == [expect(t) for t in texts]
    # truncation keeps BOS and EOT
    long = tok.encode([' '.join(['photo'] * 200)])[0]
    assert long[0] == BOS_ID and long[-1] == EOT_ID and (long != PAD_ID).all()
    assert tok.pad_id == PAD_ID


@pytest.fixture(scope='module')
def corpus():
    return captions()


def test_sentencepiece_round_trip(tmp_path, corpus):
    import sentencepiece as spm
    prefix = str(tmp_path / 'sp')
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=300,
                                   hard_vocab_limit=False, model_type='unigram', character_coverage=1.0,
                                   byte_fallback=True,
                                   num_threads=1, minloglevel=2)
    tok = SentencePieceTokenizer(prefix + '.model', max_len=64)
    assert tok.vocab_size == spm.SentencePieceProcessor(model_file=prefix + '.model').get_piece_size() + 3
    assert tok.vocab_size > 256 + 3  # the byte-fallback pieces are part of it
    texts = corpus[:50] + ['the café at night', 'unseen wörds ✓ zebra']  # byte fallback covers anything
    check_interface(tok, texts, expect=lambda t: t)
    cfg = ml_collections.ConfigDict({'tokenizer': 'sentencepiece', 'tokenizer_path': prefix + '.model',
                                     'max_len': 64, 'vocab_size': 512})
    np.testing.assert_array_equal(get_tokenizer(cfg).encode(texts), tok.encode(texts))


def test_hf_tokenizers_bpe_round_trip(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=['<unk>'], show_progress=False)
    hf.train_from_iterator(corpus, trainer=trainer)
    path = str(tmp_path / 'tokenizer.json')
    hf.save(path)
    tok = HFTokenizer(path, max_len=64)
    assert tok.vocab_size == hf.get_vocab_size() + 3
    texts = corpus[:50] + ['Mixed CASE, punctuation!?', 'unseen wörds ✓ zebra']  # byte-level: anything
    check_interface(tok, texts, expect=lambda t: t)
    for text in texts[:5]:  # batch encode == per-text encode of the base class
        assert tok.text_to_ids(text) == [i + 3 for i in hf.encode(text).ids]
    cfg = ml_collections.ConfigDict({'tokenizer': 'hf', 'tokenizer_path': path, 'max_len': 64,
                                     'vocab_size': 512})
    np.testing.assert_array_equal(get_tokenizer(cfg).encode(texts), tok.encode(texts))


def test_clip_bpe_merges_round_trip_and_clip_rules(tmp_path, corpus):
    merges = bpe.train_merges(corpus, num_merges=60)
    assert len(merges) == 60 and len(set(merges)) == 60
    assert len(bpe.train_merges(corpus, num_merges=10_000)) < 200  # stops when every word is one symbol
    path = str(tmp_path / 'merges.txt')
    bpe.write_merges(path, merges)
    assert bpe.load_merges(path) == merges
    gz = str(tmp_path / 'merges.txt.gz')
    with gzip.open(gz, 'wt', encoding='utf-8') as handle:
        handle.write(open(path, encoding='utf-8').read())
    assert bpe.load_merges(gz, max_merges=10) == merges[:10]
    # OpenAI's bpe_simple_vocab_16e6.txt starts with this header line, which is not a merge
    clip_style = tmp_path / 'clip_merges.txt'
    clip_style.write_text('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges))
    assert bpe.load_merges(str(clip_style)) == merges

    tok = bpe.ClipBpeTokenizer(path, max_len=77)
    assert tok.vocab_size == 512 + 60 + 3
    # frequent words become single tokens after enough merges
    assert len(tok.text_to_ids('photo')) == 1 and len(tok.text_to_ids('sitting')) == 1
    texts = corpus[:50] + ['the café at night', 'two dogs ✓ zebra']
    check_interface(tok, texts, expect=lambda t: t)
    # CLIP normalisation: lower-case, html unescaped, whitespace collapsed, punctuation split off, digits single
    assert tok.decode(tok.encode(['A  Photo &amp; THE\tCat,  2024!'])) == ['a photo & the cat , 2 0 2 4 !']
    # literal special strings in text do not inject EOT / BOS
    row = tok.encode(['a <|endoftext|> b <|startoftext|>'])[0]
    assert (row == EOT_ID).sum() == 1 and (row == BOS_ID).sum() == 1
    # context length: truncation keeps <end_of_text> as the last token
    short = bpe.ClipBpeTokenizer(path, max_len=5).encode(['a photo of the cat on the sofa'])[0]
    assert short[0] == BOS_ID and short[-1] == EOT_ID and len(short) == 5
    cfg = ml_collections.ConfigDict({'tokenizer': 'clip_bpe', 'tokenizer_path': path, 'max_len': 77,
                                     'vocab_size': 575, 'bpe_max_merges': 40})
    assert get_tokenizer(cfg).vocab_size == 512 + 40 + 3
    with pytest.raises(ValueError, match='two symbols'):
        bad = tmp_path / 'bad.txt'
        bad.write_text('#version: 0.2\na b c\n')
        bpe.load_merges(str(bad))


def test_bpe_merge_order_is_respected(tmp_path):
    # merges (l, o), (lo, w</w>) make 'low' one token; without the second, 'low' is 'lo' + 'w</w>'
    path = tmp_path / 'm.txt'
    path.write_text('#version: 0.2\nl o\nlo w</w>\n')
    tok = bpe.ClipBpeTokenizer(str(path), max_len=8)
    assert len(tok.text_to_ids('low')) == 1 and len(tok.text_to_ids('lower')) == 4  # lo w e r</w>
    bpe.write_merges(str(path), [('l', 'o')])
    assert len(bpe.ClipBpeTokenizer(str(path), max_len=8).text_to_ids('low')) == 2


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / 'm.txt'
    bpe.write_merges(str(path), [('a', 'b')])
    cfg = ml_collections.ConfigDict({'tokenizer': 'clip_bpe', 'tokenizer_path': str(path), 'max_len': 8,
                                     'vocab_size': 300})
    with pytest.raises(ValueError, match='model.text.vocab_size=300'):
        get_tokenizer(cfg)
    with pytest.raises(ValueError, match='tokenizer_path'):
        get_tokenizer(ml_collections.ConfigDict({'tokenizer': 'hf', 'tokenizer_path': '', 'max_len': 8}))


def test_vocab_checked_against_the_model_embedding(tmp_path):
    from mmjax.models import build_model
    from tests.tiny_config import get_config
    path = tmp_path / 'm.txt'
    bpe.write_merges(str(path), bpe.train_merges(captions(50), 10))
    tok = bpe.ClipBpeTokenizer(str(path), max_len=8)  # 525 ids
    config = get_config()
    config.model.text.max_len = 8
    for vocab_size, ok in ((259, False), (525, True)):
        config.model.text.vocab_size = vocab_size
        model = build_model(config.model)
        batch = {'image': jnp.zeros((1, 16, 16, 3)), 'text': jnp.asarray(tok.encode(['a cat']))}
        params = jax.eval_shape(lambda b, model=model: model.init(jax.random.PRNGKey(0), b), batch)['params']
        if ok:
            check_embedding_vocab(tok, params)
        else:  # 259 rounds up to 384 rows (vocab_multiple 128) < 525
            with pytest.raises(ValueError, match='model.text.vocab_size >= 525'):
                check_embedding_vocab(tok, params)


def _any_tokenizer(kind, tmp_path, corpus):
    """One trained tokenizer of each kind, small."""
    from mmjax.data.tokenizers import ByteTokenizer
    if kind == 'bytes':
        return ByteTokenizer(max_len=64)
    if kind == 'sentencepiece':
        import sentencepiece as spm
        prefix = str(tmp_path / 'sp')
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=300,
                                       hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
                                       num_threads=1, minloglevel=2)
        return SentencePieceTokenizer(prefix + '.model', max_len=64)
    if kind == 'hf':
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        hf.save(str(tmp_path / 'tokenizer.json'))
        return HFTokenizer(str(tmp_path / 'tokenizer.json'), max_len=64)
    path = str(tmp_path / 'merges.txt')
    bpe.write_merges(path, bpe.train_merges(corpus, num_merges=60))
    return bpe.ClipBpeTokenizer(path, max_len=64)


@pytest.mark.parametrize('kind', ['bytes', 'sentencepiece', 'hf', 'clip_bpe'])
def test_detokenize_generated_rows(tmp_path, corpus, kind):
    """What a decoder writes detokenizes back to the text: a generated row (no BOS; EOT, then anything, which is
    ignored), a prompt followed by its continuation (the ids of one text split anywhere), and a row without EOT."""
    tok = _any_tokenizer(kind, tmp_path, corpus)
    texts = ['a photo of the cat on the sofa', 'two people walking at night', 'the small green tree']
    for text in texts:
        ids = tok.text_to_ids(text)
        generated = np.array(ids + [EOT_ID] + [5, 7, BOS_ID] + [PAD_ID] * 3, np.int32)
        assert tok.decode(generated) == [text]
        assert tok.decode(np.array(ids, np.int32)) == [text]  # ran out of room before EOT
        for cut in (1, len(ids) // 2, len(ids) - 1):
            row = np.array([BOS_ID] + ids[:cut] + ids[cut:] + [EOT_ID, PAD_ID], np.int32)
            assert tok.decode(row[None]) == [text]
        assert tok.decode(tok.encode([text])) == [text]
