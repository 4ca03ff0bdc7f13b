"""Image + text + audio: three towers trained together on (digit image, caption, spoken digit) triples, 2 CPU cores.

Data: data.name='digits_speech' (mmjax/data/speech_triples.py): the embedded digits, each example with an
espeak-ng clip of its number word (20 training voices; the 4 voices of speech_triples.HELD_OUT_VOICES are held
out). Losses (model.pairs): image-text (weight 1) + audio-text (weight 1), one shared temperature; the
image-audio pair gets no direct loss, so image <-> audio alignment comes through the text. Per-pair losses are
logged as 'loss/image_text' and 'loss/audio_text'.

Run:
    mmjax train --config configs/image_text_audio.py --workdir /tmp/mmjax_image_text_audio

Expected (metrics.jsonl, end of training): 'zeroshot/image/top1' (= 'zeroshot/top1', 360 held-out digit images)
and 'zeroshot/audio/top1' (240 held-out-voice clips), both against the ten number prompts. Measured: image 0.9833,
audio 1.0 (top-5 1.0 both), final loss 5.19 (image-text + audio-text); 819 s wall with other jobs on the 2 cores
(636 CPU-s: 512 user + 125 sys), 0.36M params.
"""

from mmjax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.data.name = "digits_speech"

    c.model.towers = ("image", "text", "audio")
    c.model.pairs = (("image", "text", 1.0), ("audio", "text", 1.0))
    c.model.embed_dim = 64
    c.model.loss = "softmax"
    c.model.image.update(image_size=32, patch_size=8, channels=3, width=64, depth=2, num_heads=4,
                         mlp_dim=256, pool="cls")
    c.model.text.update(vocab_size=384, max_len=40, width=64, depth=2, num_heads=4, mlp_dim=256,
                        causal=True, pool="eot", tokenizer="bytes")
    c.model.audio.update(sample_rate=16000, n_fft=400, hop=160, n_mels=32, max_frames=88, patch_time=8,
                         patch_freq=8, width=64, depth=2, num_heads=4, mlp_dim=256, pool="cls")

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.05

    c.train.steps = 600
    c.train.batch_size = 128
    c.train.log_every = 50
    c.checkpoint.every_steps = 200
    # 'zeroshot/top1' (= 'zeroshot/image/top1': held-out digit images) and 'zeroshot/audio/top1' (held-out voices)
    c.eval.zeroshot = True
    return c
