"""Every key mmjax knows, with its default, and the single owner of the constants that others import.

A config is data: a locked `ml_collections.ConfigDict` whose every key exists in `base_config()`. Config files
in `configs/` start from `base_config()` and change values; they never add keys.
"""

from __future__ import annotations

import math
import os

import ml_collections

from mmjax import storage

FUSION_MODES = ("concat", "weighted", "gated", "xattn")  # models.fusion builds one module per mode
# model.fusion.backbone of task 'classification': 'towers' = FusionClassifier (model.image / model.text towers,
# co-attention, a fusion module, an MLP head); 'multiway' = BEiT-3's stack as the fusion encoder
# (mmjax/models/multiway_classifier.py: model.mdm shapes, its image CLS and text BOS tokens into the MLP head; init_from
# a task 'mdm' workdir loads the stack), which reads only num_classes and hidden of model.fusion.
FUSION_BACKBONES = ("towers", "multiway")
PAD_ID, BOS_ID, EOT_ID = 0, 1, 2  # every tokenizer's pad, BOS (= CLS) and EOT ids; models mask PAD_ID
SPECIAL_TOKEN_IDS = (PAD_ID, BOS_ID, EOT_ID)

MESH_AXES = ("data", "fsdp", "tensor")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None). The vocabulary is the one every
# module uses; changing parallelism is an edit of this table, never of a model.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_joint", None),
    ("act_vocab", "tensor"),  # decoder logits [B, L, vocab] (models/decoder.py)
    ("cache_batch", ("data", "fsdp")),  # decoding key/value caches (models/attention.py CACHE_AXES)
    ("cache_sequence", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("length", None),
    ("joint", None),
    ("layers", None),
    ("channels", None),
    ("adapter", None),  # bottleneck of fine-tuning adapters (mmjax.training.finetune)
    ("lora", None),  # rank axis of LoRA factors
)

FINETUNE_MODES = ("none", "linear_probe", "full", "adapter", "prompt", "lora", "locked_image")

MODALITIES = ("image", "text", "audio")  # the towers a model may have (model.towers)
# Dataset (config.data.name) -> the fields its evaluation splits provide. Caption corpora ('spec', 'tfds',
# 'mixture') provide none: they have no class labels, class prompts or held-out split for the evaluators.
EVAL_FIELDS = {"digits": ("image", "label", "class_prompts", "captions"),
               "digits_speech": ("image", "label", "class_prompts", "captions", "audio")}
# Evaluator (config.eval.<name>) -> the fields it needs.
EVALUATOR_NEEDS = {"zeroshot": ("image", "label", "class_prompts"), "retrieval": ("image", "captions"),
                   "linear_probe": ("image", "label")}
AUDIO_DATASETS = tuple(n for n, fields in EVAL_FIELDS.items() if "audio" in fields)  # data.name with clips
DTYPES = ("float32", "bfloat16", "float16")


def _data_defaults(c: ml_collections.ConfigDict) -> None:
    """data: which data, where it is prepared, augmentation."""
    # Data (mmjax/data/sources.py). data.name picks the kind of data:
    #   "digits"  the embedded labelled digits (zero-shot eval works);
    #   "spec"    data.spec = path of a JSON builder spec (webdataset / img2dataset tars, CSV / TSV, COCO captions
    #             JSON; see mmjax/data/builders.py) or an inline JSON object; prepared into data_dir on first use;
    #   "tfds"    data.tfds_name = an already-prepared TFDS dataset under data_dir, read through the features
    #             data.tfds_image_key and data.tfds_caption_key ('a/b' for nested features);
    #   "wds_stream" data.spec = a webdataset spec whose tar shards (local or gs:// / s3://) are streamed in place,
    #             without preparing them (data.shuffle_buffer, data.open_shards);
    #   "mixture" data.mixture = (("a.json", 0.7), ("tfds:coco_captions", 0.3)): (source, weight) pairs, a
    #             source being a spec file, an inline JSON spec or "tfds:<name>"; weights > 0, relative; every
    #             block of 1,000 examples holds each dataset in proportion (deterministic, resumable).
    # Caption corpora have no class labels: final zero-shot eval is skipped for them (eval.zeroshot).
    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.data_dir = ""  # "" -> $MMJAX_DATA_DIR or ~/.cache/mmjax/tfds (created on first use)
    c.data.spec = ""
    c.data.tfds_name = ""
    c.data.tfds_image_key = "image"
    c.data.tfds_caption_key = "caption"
    c.data.mixture = ()
    c.data.train_split = "train"
    c.data.num_workers = 0
    # data.name='wds_stream' (tar shards streamed in place, mmjax/data/stream.py): raw samples held by each reader's
    # shuffle buffer (memory: about this many encoded images per grain worker), and shards each reader reads
    # round-robin at a time.
    c.data.shuffle_buffer = 2000
    c.data.open_shards = 4
    c.data.augment = True  # digits: random affine; captioned data: random-resized crop + flip (else center crop)
    c.data.crop_scale = (0.08, 1.0)  # area fraction range of the random-resized crop (captioned data)
    c.data.image_mean = (0.5, 0.5, 0.5)
    c.data.image_std = (0.5, 0.5, 0.5)
    c.data.captions = "english"  # digits caption/prompt style: 'english' | 'french' (a fine-tuning task)
    # Pre-tokenised images (mmjax/data/image_codes.py, written by `mmjax tokenize`): the training stream reads each
    # image's codes from here instead of the image (task 'text_to_image'); "" reads the images.
    c.data.codes_dir = ""



def _model_defaults(c: ml_collections.ConfigDict) -> None:
    """model: the towers, the contrastive loss, the fusion heads; objectives of itm_mlm."""
    c.model = ml_collections.ConfigDict()
    m = c.model
    m.embed_dim = 64
    m.dtype = "float32"
    m.param_dtype = "float32"
    m.remat = "none"
    m.activation = "gelu"  # MLP nonlinearity: 'gelu' (exact) | 'gelu_tanh' | 'quick_gelu' (OpenAI CLIP)
    m.scan_layers = False
    m.loss = "softmax"
    m.loss_impl = "plain"  # 'plain' (B x B logits) | 'chunked' (ring over data*fsdp, memory ~ B*d)
    m.loss_chunk_size = 1024  # rows per tile of the chunked loss; must divide the per-device batch
    m.logit_scale_init = math.log(1 / 0.07)
    m.logit_scale_max = math.log(100.0)
    m.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
    m.image = ml_collections.ConfigDict(
        dict(image_size=32, patch_size=4, channels=3, width=64, depth=2, num_heads=4,
             mlp_dim=256, pool="cls"))
    m.text = ml_collections.ConfigDict(
        dict(vocab_size=384, max_len=32, width=64, depth=2, num_heads=4, mlp_dim=256,
             causal=True, pool="eot", tokenizer="bytes", tokenizer_path=""))
    # Towers built (model.<name> sections used) and the modality pairs that get a contrastive loss:
    # loss = sum over pairs (a, b, weight) whose both modalities are in the batch of weight * loss(a, b).
    m.towers = ("image", "text")  # any of 'image', 'text', 'audio' (audio needs data.name='digits_speech')
    m.pairs = (("image", "text", 1.0),)
    # AudioTransformer (mmjax/models/audio.py): waveform -> log-mel (JAX) -> patches -> encoder. The defaults fit
    # the spoken digits (16 kHz, clips <= 0.81 s): max_frames * hop - 1 samples are fed (zero-padded + lengths).
    m.audio = ml_collections.ConfigDict(
        dict(sample_rate=16000, n_fft=400, hop=160, n_mels=32, max_frames=88, patch_time=8, patch_freq=8,
             width=64, depth=2, num_heads=4, mlp_dim=256, pool="cls", mel_scale="slaney", f_min=0.0,
             f_max=ml_collections.FieldReference(None, field_type=float), input_mean=-37.0, input_std=22.0))
    # task 'classification': FusionClassifier, or with backbone='multiway' BEiT-3's stack (see FUSION_BACKBONES).
    m.fusion = ml_collections.ConfigDict(
        dict(backbone="towers", mode="concat", num_layers=1, num_heads=4, mlp_dim=256, hidden=128, num_classes=2,
             proj_dim=ml_collections.FieldReference(None, field_type=int), per_feature=True,
             contrastive_weight=0.0))  # > 0: + weight * CLIP loss on the towers' embeddings of matching pairs
    # task 'itm_mlm': ContrastiveModel + image-conditioned text layers with ITM and MLM heads.
    m.itm_mlm = ml_collections.ConfigDict(dict(num_layers=1, num_heads=4, mlp_dim=256, pool="eot"))
    # task 'vq' (mmjax/models/vq.py): conv VQ autoencoder, one level per width, a stride-2 conv between levels
    # (codes on a grid of image_size / 2^(len(widths)-1)); cosine codebook of codebook_size x code_dim whose rows
    # start at norm codebook_init_norm (the lookup normalises them: a smaller norm turns them faster under AdamW).
    # loss = recon_loss ('l2' | 'l1'; of the output clipped to the pixel range with clip_loss) + codebook_weight *
    #   |sg(z)-e|^2 + commitment_weight * |z-sg(e)|^2 + restart_weight * (unused codes pulled onto latents; 0: off).
    m.vq = ml_collections.ConfigDict(
        dict(widths=(32, 64), res_blocks=1, code_dim=8, codebook_size=128, codebook_init_norm=0.1, recon_loss="l2",
             clip_loss=False, codebook_weight=1.0, commitment_weight=0.25, restart_weight=1.0))
    # task 'mdm' (BEiT-3, mmjax/models/multiway.py, mmjax/tasks/mdm.py): a multiway transformer (shared attention,
    # vision / language / vision-language FFN experts, 'vl' in the top vl_layers) on model.image patches and
    # model.text tokens; image targets: the codes of the image_tokenizer (`mmjax train` loads it into the model and
    # freezes it, training one first when its workdir is empty). Blockwise image masking (blocks >= min_block_patches),
    # BERT text masking (objectives.mask_id). loss = image_weight * MIM + text_weight * MLM + pair_weight * pair MLM
    # (+ contrastive_weight * CLIP loss of the image and text passes, unmasked when their weight is 0).
    # pair_word_mask_prob: the share of pair captions masked by whole words (number words always among them).
    m.mdm = ml_collections.ConfigDict(
        dict(width=64, depth=4, num_heads=4, mlp_dim=256, vl_layers=2, image_mask_ratio=0.4, min_block_patches=4,
             text_mask_ratio=0.15, pair_text_mask_ratio=0.5, pair_word_mask_prob=1.0, image_weight=1.0,
             text_weight=1.0, pair_weight=1.0, contrastive_weight=0.0))
    # task 'prefix_lm' (PaLI-style, mmjax/models/pali.py, mmjax/tasks/prefix_lm.py): model.image (and model.audio
    # when 'audio' is in model.towers) tokens, then a task prefix, one TextDecoder (width, depth, ..., max_len
    # positions; vocabulary model.text.vocab_size) writes the answer. prompt_len / answer_len: text slots (the
    # answer's include EOT). tasks: (task, weight) of mmjax/data/multitask.py drawn into every batch; held_out:
    # (task, K, digit) never trained on (K = -1: every K), scored as vqa/heldout/<task>/accuracy.
    m.prefix_lm = ml_collections.ConfigDict(
        dict(width=64, depth=2, num_heads=4, mlp_dim=256, max_len=128, prompt_len=40, answer_len=20,
             tasks=(("caption", 1.0), ("what_number", 1.0), ("even", 1.0), ("greater", 1.0), ("plus", 1.0),
                    ("transcribe", 0.0), ("speaker_match", 0.0)),
             held_out=(("plus", 3, 6), ("greater", 4, 7))))

    # task 'coca' (mmjax/models/coca.py): ViT -> pooler (1 + caption_queries queries; pooler_width 0 = text width)
    # -> unimodal text (model.text) -> decoder_depth multimodal blocks (0 = text heads / mlp_dim), cross-attention in
    # every cross_attention_every-th; loss = contrastive + captioning_weight * caption CE. Eval: beam eval_beam,
    # at most max_new_tokens tokens (0: text max_len - 1).
    m.coca = ml_collections.ConfigDict(
        dict(caption_queries=16, pooler_width=0, pooler_heads=4, decoder_depth=2, decoder_heads=0, decoder_mlp_dim=0,
             cross_attention_every=1, captioning_weight=1.0, eval_beam=4, max_new_tokens=0))

    # task 'itm_mlm': loss = contrastive + itm_weight * ITM + mlm_weight * MLM (BERT masking).
    c.objectives = ml_collections.ConfigDict(
        dict(itm_weight=1.0, mlm_weight=1.0, mask_prob=0.15, mask_id=259))



def _optim_defaults(c: ml_collections.ConfigDict) -> None:
    """optim: AdamW, the schedule, weight-decay and freeze rules."""
    c.optim = ml_collections.ConfigDict()
    o = c.optim
    o.lr = 1e-3
    o.end_lr_factor = 0.0
    o.warmup_steps = 50
    o.decay = "cosine"
    o.b1 = 0.9
    o.b2 = 0.98
    o.eps = 1e-6
    o.weight_decay = 0.1
    o.clip_norm = ml_collections.FieldReference(1.0, field_type=float)
    o.wd_rules = (
        (r".*(bias|scale|embedding|pos_embed|cls)", 0.0),
        (r"logit_.*", 0.0),
        (r".*(_gate|alpha_logit)", 0.0),  # fusion gates and mixing weights
        (r".*", 1.0),
    )
    o.freeze_rules = ()  # regexes of parameter paths that get no update and no optimizer state



def _run_defaults(c: ml_collections.ConfigDict) -> None:
    """train, mesh, sharding, checkpoint: the run itself."""
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64
    # Gradient accumulation inside the step (task 'contrastive'; GradCache, equal to the large-batch step):
    # k micro-batches of batch_size / k; k must divide the per-device batch batch_size / (data*fsdp).
    c.train.micro_batches = 1
    c.train.log_every = 10
    c.train.max_nonfinite_steps = 5  # stop after this many consecutive non-finite steps
    c.train.spike_factor = 3.0  # report a loss above this x its running mean (0 disables)
    c.train.spike_window = 50

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True



def _eval_and_finetune_defaults(c: ml_collections.ConfigDict) -> None:
    """eval, finetune, init_from."""
    c.eval = ml_collections.ConfigDict()
    c.eval.zeroshot = True  # zero-shot top-1/top-5 against the dataset's class prompts
    # Zero-shot prompt templates ('{}' = the class name), e.g. phrased like the training captions; () = the dataset's.
    c.eval.zeroshot_templates = ()
    c.eval.retrieval = False  # image<->text R@1/5/10 (during training; `mmjax eval` always runs it)
    c.eval.linear_probe = False  # logistic regression on frozen image features (idem)
    c.eval.every_steps = 0  # also evaluate every this many steps during training (0: only at the end)
    c.eval.batch_size = 256
    # Captioning evaluation on a caption corpus (task 'coca'): its split with every reference caption of an image
    # (e.g. 'val' of a COCO-captions spec), at most caption_examples images; '' = none (the digits use their own).
    c.eval.caption_split = ""
    c.eval.caption_examples = 1000

    # Fine-tuning (mmjax/training/finetune.py): the mode adds modules to the towers and freezes parameters by regex.
    c.finetune = ml_collections.ConfigDict()
    f = c.finetune
    f.mode = "none"  # 'none' | 'linear_probe' | 'full' | 'adapter' | 'prompt' | 'lora' | 'locked_image'
    f.towers = ("image", "text")  # towers that get adapters / prompts / LoRA (any of model.towers)
    f.adapter_dim = 16  # mode 'adapter': bottleneck width
    f.prompt_len = 8  # mode 'prompt': learned tokens per tower
    f.lora_rank = 4  # mode 'lora': W + (lora_alpha / lora_rank) A B
    f.lora_alpha = 8.0
    f.lora_targets = "attn/(query|value)"  # regex on '<attn|mlp>/<query|key|value|out|fc_in|fc_out>'
    f.trainable = ""  # regex of extra parameters to train on top of the mode's (e.g. '[^/]+/head/kernel')

    # Start from another run's parameters (only when the workdir has no checkpoint of its own).
    c.init_from = ml_collections.ConfigDict()
    c.init_from.path = ""  # a workdir (with config.json and checkpoints/), or its checkpoints/ folder
    c.init_from.step = ml_collections.FieldReference(None, field_type=int)  # None: the latest
    c.init_from.include = ".*"  # regex of parameter paths to load; the others keep their fresh init
    # ((regex, replacement), ...): checkpoint parameter names -> the model's (first fullmatch; re.Match.expand)
    c.init_from.rename = ()
    # More sources, loaded after init_from.path: dicts with path and optional step, include, rename
    c.init_from.more = ()

    # The image tokenizer (a task 'vq' workdir) of the generative tasks; '' = train one in <workdir>/tokenizer.
    # Training one (config.model.vq, image, data of the generator's config): steps, batch_size, lr.
    c.image_tokenizer = ml_collections.ConfigDict(dict(workdir="", steps=400, batch_size=128, lr=2e-3))

# task 'flamingo': what model.flamingo.stage='flamingo' freezes (optim.freeze_rules must hold these): the vision
# encoder and the LM but its gated cross-attention ('ln_xattn', 'xattn', 'xattn_gate') and its token table, whose
# old rows the objective keeps fixed (only the <image> and <|endofchunk|> rows train).
FLAMINGO_FREEZE_RULES = (r"vision/.*",
                         r"lm/(?!token_embed/|transformer/block_\d+/(ln_xattn/|xattn/|xattn_gate$)).*")


def _flamingo_defaults(c: ml_collections.ConfigDict) -> None:
    """model.flamingo: task 'flamingo' (mmjax/models/flamingo.py, mmjax/tasks/flamingo.py)."""
    # stage 'lm': the text-only LM (model.text shapes) on the captions of interleaved sequences; 'flamingo': ViT
    # (model.image, frozen) -> perceiver resampler (num_latents tokens per image, resampler_* shapes) -> the LM
    # (frozen, e.g. by init_from a stage-'lm' workdir) with a tanh-gated cross-attention in every
    # cross_attention_every-th block. Training sequences hold max_images digits (train.batch_size counts images).
    # Eval: greedy few-shot captioning of the test digits at each of `shots` (support from the train split;
    # eval_queries test images, 0 = all), and 2-way episodes named by made-up words (madeup_eval).
    c.model.flamingo = ml_collections.ConfigDict(
        dict(stage="flamingo", num_latents=8, resampler_depth=2, resampler_heads=4, resampler_mlp_dim=256,
             cross_attention_every=1, max_images=5, shots=(0, 2, 4), madeup_eval=True, eval_queries=0,
             max_new_tokens=10, eval_seed=0))



def _text_to_image_defaults(c: ml_collections.ConfigDict) -> None:
    """model.text_to_image: task 'text_to_image'."""
    # task 'text_to_image' (mmjax/models/text_to_image.py, mmjax/tasks/text_to_image.py): one decoder (width, depth,
    # num_heads, mlp_dim) over the caption (model.text) then the image_vocab codes of the image_tokenizer; loss: CE on
    # image tokens only; captions blanked with probability caption_dropout (classifier-free guidance); input_noise:
    # the share of teacher-forced input codes replaced by random ones (targets unchanged). Sampling:
    # temperature, top_k (0: off), top_p; guidance: the scale eval and generate_images default to. Eval:
    # eval_samples per prompt (uniqueness, accuracy), eval_guidance (accuracy vs scale), rerank_factor x candidates.
    c.model.text_to_image = ml_collections.ConfigDict(
        dict(width=128, depth=4, num_heads=4, mlp_dim=512, image_vocab=128, caption_dropout=0.1, input_noise=0.0,
             guidance=3.0,
             temperature=1.0, top_k=0, top_p=1.0, eval_samples=16, eval_guidance=(0.0, 1.0, 2.0, 3.0),
             rerank_factor=4))


def base_config() -> ml_collections.ConfigDict:
    """All keys mmjax knows, with defaults. Config files override values, never add keys."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "contrastive"

    for add_section in (_data_defaults, _model_defaults, _optim_defaults, _run_defaults, _eval_and_finetune_defaults,
                        _flamingo_defaults, _text_to_image_defaults):
        add_section(c)
    return c


def model_towers(config) -> tuple[str, ...]:
    """The towers `config`'s model has (`model.towers`; the fusion tasks keep the default image and text)."""
    return tuple(config.model.get("towers", ("image", "text")))


def default_data_dir() -> str:
    """$MMJAX_DATA_DIR, else ~/.cache/mmjax/tfds: where data goes when data.data_dir is empty."""
    return os.environ.get("MMJAX_DATA_DIR", os.path.expanduser("~/.cache/mmjax/tfds"))


def data_dir(config) -> str:
    """Where TFDS datasets are prepared and read: data.data_dir (made absolute), else `default_data_dir()`."""
    if config.data.get("data_dir"):
        return storage.absolute(config.data.data_dir)
    return default_data_dir()
