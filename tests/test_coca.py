"""Task 'coca': the model's parts, the objective, a tiny training run through `mmjax train`, captioning through
`mmjax.load(W).caption` and `mmjax generate`, the captioning metrics, and open_clip CoCa parity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import cli, tasks
from mmjax.config import BOS_ID, EOT_ID, PAD_ID
from mmjax.data import digit_captions, digits
from mmjax.eval import captioning
from mmjax.models.coca import AttentionalPooler
from mmjax.tasks.coca import caption_loss

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIG = os.path.join(ROOT, "configs", "coca_digits.py")
TINY = ["--config.model.text.max_len=40", "--config.model.coca.caption_queries=8", "--config.train.batch_size=64",
        "--config.optim.warmup_steps=10", "--config.train.log_every=20", "--config.checkpoint.every_steps=1000",
        "--config.model.coca.eval_beam=2", "--config.model.coca.max_new_tokens=12", "--config.eval.zeroshot=False"]


def _config(*overrides):
    from mmjax.config import apply_overrides, load_config_file
    return apply_overrides(load_config_file(CONFIG), [o.removeprefix("--") for o in overrides])


def _init(config, seed=0):
    task = tasks.get_task(config)
    model = task.build_model(config.model)
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in task.dummy_batch(config, 2).items()}
    return model, jax.tree.map(lambda x: getattr(x, "value", x), model.init(jax.random.key(seed), batch)["params"],
                               is_leaf=lambda x: hasattr(x, "value"))


def test_pooler_and_model_shapes():
    tokens = jnp.ones((2, 5, 12))
    out, _ = AttentionalPooler(4, 8, 2).init_with_output(jax.random.key(0), tokens)
    assert out.shape == (2, 4, 8)
    config = _config("--config.model.coca.caption_queries=6")
    model, params = _init(config)
    image = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    text = jnp.asarray(np.tile(np.array([[BOS_ID, 10, 11, EOT_ID] + [PAD_ID] * 44]), (3, 1)), jnp.int32)
    out = model.apply({"params": params}, {"image": image, "text": text})
    assert out["embeddings"]["image"].shape == (3, 64) and out["embeddings"]["text"].shape == (3, 64)
    assert out["caption_logits"].shape == (3, 48, 384)
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"]["image"], axis=-1), 1.0, rtol=1e-5)
    media = model.apply({"params": params}, image, method="caption_media")
    assert media.shape == (3, 6, 64)


def test_text_embedding_independent_of_image_caption_logits_not():
    config = _config()
    model, params = _init(config)
    text = jnp.asarray(digits_tokens(config, ["a thin seven", "the number two written with a thick stroke"]))
    a, b = (jax.random.normal(jax.random.key(s), (2, 32, 32, 3)) for s in (1, 2))
    out_a = model.apply({"params": params}, {"image": a, "text": text})
    out_b = model.apply({"params": params}, {"image": b, "text": text})
    np.testing.assert_array_equal(out_a["embeddings"]["text"], out_b["embeddings"]["text"])
    np.testing.assert_array_equal(out_a["embeddings"]["text"], model.apply({"params": params}, text,
                                                                            method="encode_text"))
    assert np.abs(np.asarray(out_a["caption_logits"] - out_b["caption_logits"])).max() > 1e-4


def digits_tokens(config, texts):
    from mmjax.data.tokenizers import get_tokenizer
    return get_tokenizer(config.model.text).encode(texts)


def test_caption_loss_ignores_pad():
    rng = np.random.default_rng(0)
    tokens = np.array([[BOS_ID, 5, 6, 7, EOT_ID, PAD_ID, PAD_ID], [BOS_ID, 9, EOT_ID, PAD_ID, PAD_ID, PAD_ID,
                                                                    PAD_ID]], np.int32)
    logits = rng.normal(size=(2, 7, 12)).astype(np.float32)
    loss, metrics = caption_loss(jnp.asarray(logits), jnp.asarray(tokens))
    garbage = logits.copy()
    pad_target = np.zeros(tokens.shape, bool)
    pad_target[:, :-1] = tokens[:, 1:] == PAD_ID
    garbage[pad_target] = np.nan  # logits whose target is PAD, and the last position (no target)
    garbage[:, -1] = 1e9
    loss2, metrics2 = caption_loss(jnp.asarray(garbage), jnp.asarray(tokens))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6) and np.isfinite(float(loss2))
    assert float(metrics["caption_tokens"]) == 6  # 4 + 2 targets: content and EOT, never PAD or BOS
    logp = jax.nn.log_softmax(logits, -1)
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, 7), (0, 3, EOT_ID), (1, 0, 9), (1, 1, EOT_ID)]
    assert float(loss) == pytest.approx(-np.mean([logp[b, l, t] for b, l, t in targets]), rel=1e-5)
    del metrics2


def test_captioning_metrics_on_hand_made_examples():
    refs = [["a thin seven leaning left", "the number seven written with a thin stroke"],
            ["a thick two, leaning right", "handwritten two, wide, leaning right"],
            ["a wide nine leaning left", "a thick and wide digit nine"]]
    perfect = ["A thin SEVEN, leaning left.", "a thick two leaning right!", "a wide nine leaning left"]
    wrong = ["a thick one leaning right", "the number five", "a narrow three"]
    assert captioning.normalize("A Seven,  THIN... (leaning-left)!") == "a seven thin leaning left"
    good, bad = captioning.caption_scores(perfect, refs), captioning.caption_scores(wrong, refs)
    for key in ("bleu4", "cider", "rouge_l"):
        assert good[key] > bad[key], key
    assert good["bleu4"] > 0.9 and good["rouge_l"] > 0.99
    assert captioning.digit_accuracy(perfect, [7, 2, 9]) == 1.0
    assert captioning.digit_accuracy(wrong, [7, 2, 9]) == 0.0
    assert captioning.digit_accuracy(["a 7 or a one", "two", ""], [7, 2, 0]) == pytest.approx(1 / 3)
    assert captioning.most_frequent_caption(["B.", "a", "b", "A", "b!"]) == "b"
    assert captioning.reference_match(perfect, refs) == 1.0 and captioning.reference_match(wrong, refs) == 0.0
    # Right but for one attribute word: not a match (BLEU-4 and CIDEr-D would still give it most of the credit).
    assert captioning.reference_match(["a thick seven leaning left", *perfect[1:]], refs) == pytest.approx(2 / 3)


def test_paired_cider_tells_a_real_difference_from_noise():
    refs = [[f"a thin {w} leaning left", f"this thin wide {w} is leaning left"] for w in digits.CLASS_NAMES] * 4
    right = [r[0] for r in refs]
    same = captioning.paired_cider(right, right, refs)
    assert same == {"cider_diff": 0.0, "cider_diff_low": 0.0, "cider_diff_high": 0.0, "better": 0.0, "worse": 0.0}
    one_word_wrong = [c.replace("thin", "thick") for c in right]
    diff = captioning.paired_cider(right, one_word_wrong, refs)
    assert diff["cider_diff_low"] > 0 and diff["better"] == 1.0 and diff["worse"] == 0.0
    corpus = [captioning.caption_scores(h, refs)["cider"] for h in (right, one_word_wrong)]
    assert diff["cider_diff"] == pytest.approx(corpus[0] - corpus[1], rel=1e-9)  # the mean of the per-image scores
    # Two captioners that differ on one image in 40: the interval straddles 0 (noise), whichever is ahead.
    mixed = [one_word_wrong[0], *right[1:]]
    mixed_other = [right[0], one_word_wrong[1], *right[2:]]
    tie = captioning.paired_cider(mixed, mixed_other, refs)
    assert tie["cider_diff_low"] < 0 < tie["cider_diff_high"] and tie["better"] == tie["worse"] == 1 / 40
    with pytest.raises(ValueError, match="same images"):
        captioning.paired_cider(right, right[:3], refs)


def test_digit_references_follow_the_pixels():
    from sklearn.datasets import load_digits
    data = load_digits()
    image = np.asarray(digits.upsample(data.images[7]))
    refs = digit_captions.references(int(data.target[7]), image)
    assert len(refs) == len(digit_captions.TEMPLATES) and all(digits.CLASS_NAMES[data.target[7]] in r for r in refs)
    thick = np.clip(image.astype(np.int32) * 2, 0, 255).astype(np.uint8)
    assert digit_captions.attributes(7, thick).stroke == "thick"
    assert digit_captions.attributes(7, (image // 4).astype(np.uint8)).stroke == "thin"
    mirrored = digit_captions.attributes(7, image[:, ::-1]).slant
    assert mirrored != digit_captions.attributes(7, image).slant or abs(digit_captions.measures(image)[1]) < 0.02


def test_every_correct_caption_scores_alike():
    """CIDEr-D on the digits ranks captioners by what their captions say, not by which template they prefer:
    on the held-out digits, captioning every image with its correct reference of template i gives the same score
    for every i, and one wrong attribute word costs the same whatever the template."""
    from sklearn.datasets import load_digits
    data = load_digits()
    held_out = np.arange(len(data.target))[np.arange(len(data.target)) % 5 == 0][:120]
    images = [np.asarray(digits.upsample(data.images[i])) for i in held_out]
    labels = [int(data.target[i]) for i in held_out]
    refs = [digit_captions.references(y, im) for y, im in zip(labels, images)]
    flip = {"thick": "thin", "thin": "thick"}
    correct, one_wrong = [], []
    for t, template in enumerate(digit_captions.TEMPLATES):
        correct.append(captioning.caption_scores([r[t] for r in refs], refs)["cider"])
        wrong = []
        for y, im in zip(labels, images):
            a = digit_captions.attributes(y, im)
            wrong.append(template.format(word=digits.CLASS_NAMES[y], **a._replace(stroke=flip[a.stroke])._asdict()))
        one_wrong.append(captioning.caption_scores(wrong, refs)["cider"])
    assert max(correct) - min(correct) < 1e-6 * max(correct), correct
    assert max(one_wrong) - min(one_wrong) < 1e-6 * max(one_wrong), one_wrong
    assert max(one_wrong) < 0.8 * min(correct), (one_wrong, correct)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("coca") / "W")
    rc = cli.main(["train", "--config", CONFIG, "--workdir", workdir, "--quiet", "--config.train.steps=150", *TINY])
    assert rc == 0
    return workdir


@pytest.mark.slow
def test_training_improves_captions_over_init(trained):
    model = mmjax.load(trained)
    config = model.config
    data = captioning.caption_eval_data(config)
    first = [refs[0] for refs in data["references"][:64]]
    batch = {"image": jnp.asarray(data["image"][:64]), "text": jnp.asarray(digits_tokens(config, first))}
    net, init_params = _init(config, seed=1)
    losses = {}
    for name, params in (("init", init_params), ("trained", model.params)):
        out = net.apply({"params": params}, batch)
        losses[name] = caption_loss(out["caption_logits"], batch["text"])[1]
    assert float(losses["trained"]["caption_acc"]) > float(losses["init"]["caption_acc"]) + 0.3
    assert float(losses["trained"]["caption_loss"]) < float(losses["init"]["caption_loss"]) - 1.0
    rows = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
    final = [r for r in rows if "caption/cider" in r][-1]
    assert final["caption/greedy/logprob"] <= final["caption/logprob"] + 1e-3  # beam >= greedy, on average
    assert "caption/baseline/cider" in final and "caption/digit_accuracy" in final
    low, diff, high = (final[f"caption/beam_vs_greedy/cider_diff{s}"] for s in ("_low", "", "_high"))
    assert low <= diff <= high
    assert diff == pytest.approx(final["caption/cider"] - final["caption/greedy/cider"], abs=1e-6)


@pytest.mark.slow
def test_beam_search_at_least_greedy_log_prob(trained):
    model = mmjax.load(trained)
    images = captioning.caption_eval_data(model.config)["image"][:24]
    prompt = [BOS_ID]
    greedy = model.caption_tokens(images, prompt, max_new_tokens=12, preprocessed=True)
    beam = model.caption_tokens(images, prompt, beam=4, max_new_tokens=12, preprocessed=True)
    assert greedy["tokens"].shape == beam["tokens"].shape == (24, 12)
    assert (beam["scores"] >= greedy["scores"] - 1e-4).mean() >= 0.9
    assert beam["scores"].mean() >= greedy["scores"].mean() - 1e-5


@pytest.mark.slow
def test_generate_cli_one_line_per_image_and_errors(trained, tmp_path, capsys):
    from sklearn.datasets import load_digits
    data = load_digits()
    gray = tmp_path / "seven.png"
    digits.upsample(data.images[7]).save(gray)  # one channel, converted to the model's three
    rgb = tmp_path / "two.jpg"
    Image.fromarray(np.repeat(np.asarray(digits.upsample(data.images[2], 48))[..., None], 3, -1)).save(rgb)
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", trained, "--images", str(gray), str(rgb), "--beam", "2"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert cli.main(["generate", "--workdir", trained, "--images", str(gray), "--top-p", "0.9",
                     "--prompt", "a"]) == 0
    out = capsys.readouterr().out.strip().split("\n")
    assert len(out) == 1 and out[0].startswith("a")
    assert cli.main(["generate", "--workdir", trained, "--images", str(gray), "--beam", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmjax: error:") and "beam" in err and "\n" not in err
    assert cli.main(["generate", "--workdir", trained, "--images", str(gray), "--prompt", "x" * 60]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmjax: error:") and "context" in err and "\n" not in err


@pytest.mark.slow
def test_eval_writes_the_caption_sheet_beside_its_numbers(trained, capsys):
    # `mmjax eval` of a captioning workdir: the contrastive numbers and a PNG of its captions of 8 test images.
    assert cli.main(["eval", "--config", CONFIG, "--workdir", trained, *TINY]) == 0
    steps = [int(n[:-5]) for n in os.listdir(os.path.join(trained, "eval")) if n[:-5].isdigit()]
    sheet = os.path.join(trained, "eval", f"captions_{max(steps)}.png")
    image = Image.open(sheet)
    assert image.size[0] > 400 and image.size[1] > 200  # 2 rows of 4 images with their captions
    assert "zeroshot/top1" in json.load(open(os.path.join(trained, "eval", f"{max(steps)}.json")))


# A tiny open_clip CoCa: vision 32x32 / 8 (pooler: 1 + 5 queries, 2 heads), text and multimodal width 32.
TINY_COCA = {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16,
                            "attentional_pool": True, "attn_pooler_queries": 6, "attn_pooler_heads": 2,
                            "output_tokens": True},
             "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 12, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2}}


def _open_clip_coca(cfg, seed):
    from tests.test_convert import _open_clip
    torch, _ = _open_clip()
    from open_clip.coca_model import CoCa
    torch.manual_seed(seed)
    model = CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "text_decoder.text_projection":  # open_clip leaves it uninitialised (torch.empty)
                p.copy_(torch.randn_like(p) * p.shape[0] ** -0.5)
            elif p.ndim:
                p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    return torch, model


def _convert_coca(torch, model, cfg, tmp_path):
    from safetensors.torch import save_file

    from mmjax.interop import open_clip_coca
    ckpt, cfg_path = str(tmp_path / "coca.safetensors"), str(tmp_path / "coca.json")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, ckpt)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    workdir = str(tmp_path / "W")
    open_clip_coca.convert(cfg_path, ckpt, workdir, text_ids="raw")
    return mmjax.load(workdir)


def _coca_parity(cfg, tmp_path, n_images, seed=0, check_generate=True):
    torch, ref = _open_clip_coca(cfg, seed)
    loaded = _convert_coca(torch, ref, cfg, tmp_path)
    assert loaded.config.task == "coca"
    size, vocab = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["vocab_size"]
    ctx = cfg["text_cfg"]["context_length"]
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, size, size, 3)).astype(np.float32)
    tokens = np.zeros((n_images, ctx), np.int64)
    for i in range(n_images):  # [SOT, ids..., EOT, 0...] in open_clip's ids
        k = int(rng.integers(0, ctx - 1))
        tokens[i, :k + 2] = [vocab - 2, *rng.integers(1, vocab - 2, k), vocab - 1]
    loaded.encoder.batch_size = n_images
    timg = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        want_img = ref.encode_image(timg).numpy()
        want_txt = ref.encode_text(torch.from_numpy(tokens)).numpy()
    assert np.abs(loaded.encoder.encode_image(images) - want_img).max() <= 1e-4
    assert np.abs(loaded.encoder.encode_text(tokens.astype(np.int32)) - want_txt).max() <= 1e-4
    if not check_generate:
        return
    pytest.importorskip("transformers", reason="open_clip's CoCa.generate needs transformers")
    seq_len = ctx
    with torch.no_grad():
        want = ref.generate(timg, seq_len=seq_len, generation_type="top_k", top_k=1, min_seq_len=1,
                            sot_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0).numpy()
    got = loaded.caption_tokens(images, [vocab - 2], max_new_tokens=seq_len - 2, eos_id=vocab - 1, banned=(),
                                  preprocessed=True)
    for row_want, row_got in zip(want[:, 1:], got["tokens"]):
        n = len(row_want) - 1  # open_clip forces EOS at seq_len: compare the tokens chosen before that
        stop = next((i + 1 for i, t in enumerate(row_want[:n]) if t in (vocab - 1, 0)), n)
        np.testing.assert_array_equal(row_got[:stop], row_want[:stop])


def test_open_clip_coca_parity_tiny(tmp_path):
    _coca_parity(TINY_COCA, tmp_path, n_images=4)


@pytest.mark.slow
def test_coco_captions_train_and_evaluate_with_every_reference(tmp_path):
    """A COCO-captions spec with a 'val' split: CoCa trains on it and its evaluation scores the captions of the
    val images against all their references (2 per image here), next to the most-frequent-caption baseline."""
    from mmjax.data import synthetic
    from mmjax.training.metrics import read_metrics

    synthetic.write_coco(str(tmp_path / "train"), 24, seed=0, min_side=40, max_side=80)
    synthetic.write_coco(str(tmp_path / "val"), 8, seed=1, min_side=40, max_side=80)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "tiny_coco", "format": "coco",
                                "splits": {"train": "train/captions.json", "val": "val/captions.json"}}))
    corpus = ["--config.data.name=spec", f"--config.data.spec={spec}", f"--config.data.data_dir={tmp_path / 'tfds'}",
              "--config.eval.caption_split=val"]
    workdir = str(tmp_path / "W")
    assert cli.main(["train", "--config", CONFIG, "--workdir", workdir, "--quiet", "--config.train.steps=3", *TINY,
                     "--config.train.batch_size=8", "--config.optim.warmup_steps=1", *corpus]) == 0
    final = [r for r in read_metrics(workdir) if "caption/cider" in r][-1]
    for key in ("caption/cider", "caption/bleu4", "caption/rouge_l", "caption/reference_match", "caption/greedy/cider",
                "caption/baseline/cider"):
        assert np.isfinite(final[key]), key
    assert "caption/digit_accuracy" not in final  # no classes in a caption corpus

    data = captioning.corpus_caption_eval_data(_config(*TINY, *corpus), "val", 100)
    assert data["image"].shape[0] == 8 and all(len(refs) == 2 for refs in data["references"])
    assert data["references"][0][1] == "a picture of " + data["references"][0][0][2:]
    with pytest.raises(Exception, match="eval.caption_split='test'"):
        captioning.corpus_caption_eval_data(_config(*TINY, *corpus), "test", 100)
