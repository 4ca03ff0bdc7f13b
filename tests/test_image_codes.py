"""Pre-tokenised images (`mmjax tokenize`, `mmjax/data/image_codes.py`, `data.codes_dir`): the codes written are
the tokenizer's codes of every image; a text-to-image run reading them trains exactly as one that runs the
tokenizer in its steps; codes of another tokenizer, a second write into the same folder and a workdir that is not
a tokenizer are refused in one line."""

import json
import os
import shutil

import numpy as np
import pytest

import mmjax
from mmjax import cli, tasks
from mmjax import config as config_lib
from mmjax.data import image_codes, pipeline, sources, synthetic
from mmjax.errors import ConfigError
from mmjax.tasks import get_task
from mmjax.tasks import text_to_image as t2i

ROOT = os.path.dirname(os.path.dirname(__file__))
VQ_CONFIG = os.path.join(ROOT, "configs", "vq_digits.py")
T2I_CONFIG = os.path.join(ROOT, "configs", "text_to_image_digits.py")
TINY_VQ = ["--quiet", "--config.model.vq.widths=(16, 32)", "--config.model.vq.codebook_size=32",
           "--config.train.batch_size=64", "--config.train.steps=30", "--config.optim.warmup_steps=5",
           "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """(data_dir, tokenizer workdir, codes folder): a tiny tokenizer and the codes `mmjax tokenize` wrote."""
    root = tmp_path_factory.mktemp("codes")
    data, vq, codes = str(root / "tfds"), str(root / "vq"), str(root / "codes")
    assert cli.main(["train", "--config", VQ_CONFIG, "--workdir", vq, f"--config.data.data_dir={data}",
                     *TINY_VQ]) == 0
    assert cli.main(["tokenize", "--workdir", vq, "--out", codes, "--batch-size", "500", "--quiet"]) == 0
    return data, vq, codes


def test_the_codes_are_the_tokenizers_codes_of_every_image(tokenized):
    data, vq, codes = tokenized
    tokenizer = mmjax.load(vq)
    info = image_codes.read_info(codes)
    assert info["tokenizer"] == os.path.abspath(vq) and info["step"] == 30 and info["codebook_size"] == 32
    assert info["grid"] == 4 and info["dataset"] == "digits"
    for split in ("train", "test"):
        source = pipeline.make_source(tokenizer.config, split)
        images = {int(r["index"]): r["image"] for r in map(pipeline.DecodeExample().map, source)}
        written = image_codes.data_source(codes, split)
        assert len(written) == len(images) == info["splits"][split]
        order = [int(written[i]["index"]) for i in range(len(written))]
        expected = tokenizer.encode_tokens(np.stack([images[i] for i in order])).reshape(len(order), -1)
        got = np.stack([np.asarray(written[i]["codes"]) for i in range(len(written))])
        np.testing.assert_array_equal(got, expected)


def test_a_folder_with_codes_and_a_workdir_that_is_not_a_tokenizer_are_refused(tokenized, tmp_path, capsys):
    data, vq, codes = tokenized
    assert cli.main(["tokenize", "--workdir", vq, "--out", codes, "--quiet"]) != 0
    assert "already holds pre-tokenised codes" in capsys.readouterr().err
    assert cli.main(["tokenize", "--workdir", vq, "--out", str(tmp_path / "new"), "--batch-size", "0"]) != 0
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(image_codes.CodesError, match="holds no pre-tokenised codes"):
        image_codes.read_info(str(tmp_path))


def _train_t2i(workdir, data, vq, *extra):
    return cli.main(["train", "--config", T2I_CONFIG, "--workdir", str(workdir), "--quiet",
                     f"--config.data.data_dir={data}", f"--config.image_tokenizer.workdir={vq}",
                     "--config.model.text_to_image.image_vocab=32", "--config.train.steps=20",
                     "--config.optim.warmup_steps=5",
                     "--config.train.log_every=5", "--config.checkpoint.async_save=False",
                     "--config.model.text_to_image.eval_samples=2", "--config.model.text_to_image.eval_guidance=(1.0,)",
                     *extra])


def _losses(workdir):
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_training_on_codes_equals_training_on_images(tokenized, tmp_path, capsys):
    data, vq, codes = tokenized
    assert _train_t2i(tmp_path / "images", data, vq) == 0
    assert _train_t2i(tmp_path / "codes", data, vq, f"--config.data.codes_dir={codes}") == 0
    from_images, from_codes = _losses(tmp_path / "images"), _losses(tmp_path / "codes")
    # The same stream of codes and captions: equal losses (to float rounding: two programs, with and without the
    # tokenizer, that XLA fuses differently).
    assert len(from_codes) == 4 and [s for s, _ in from_codes] == [s for s, _ in from_images]
    np.testing.assert_allclose([v for _, v in from_codes], [v for _, v in from_images], rtol=1e-5)
    config = config_lib.apply_overrides(config_lib.load_config_file(T2I_CONFIG), [f"config.data.codes_dir={codes}"])
    task = get_task(config)
    assert task.inputs(config) == ("codes", "text") and "image" not in task.step_batch(config, 2)
    assert task.flops_per_example(config) < task.flops_per_example(config_lib.load_config_file(T2I_CONFIG))

    # Codes of another tokenizer workdir (here a copy: same weights, another run) are refused before training.
    other = str(tmp_path / "other_vq")
    shutil.copytree(vq, other)
    assert _train_t2i(tmp_path / "refused", data, other, f"--config.data.codes_dir={codes}") != 0
    err = capsys.readouterr().err
    assert "data.codes_dir=" in err and "holds the codes of tokenizer" in err, err
    assert cli.main(["tokenize", "--workdir", str(tmp_path / "codes"), "--out", str(tmp_path / "x")]) != 0
    assert "not an image tokenizer" in capsys.readouterr().err
    contrastive = config_lib.apply_overrides(config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py")),
                                             [f"config.data.codes_dir={codes}"])
    with pytest.raises(ConfigError, match="task 'contrastive' reads images, not pre-tokenised codes"):
        tasks.validate(contrastive, 1)
    config.image_tokenizer.workdir = vq
    config.data.data_dir, config.model.text_to_image.image_vocab = data, 32
    with pytest.raises(ConfigError, match="holds codes of 'digits', not of this config's data 'digits_speech'"):
        config.data.name = "digits_speech"
        t2i.check_codes(config, config_lib.load_workdir_config(vq))


@pytest.fixture(scope="module")
def corpus_codes(tmp_path_factory):
    """(corpus overrides, tokenizer workdir, codes folder): a COCO-style caption corpus (2 captions per image), a
    tiny tokenizer trained on it, and the codes `mmjax tokenize` wrote of its train split."""
    root = tmp_path_factory.mktemp("corpus")
    synthetic.write_coco(str(root / "coco"), 48, seed=0, min_side=24, max_side=48)
    spec = synthetic.write_spec(str(root / "coco"), "coco_tiny", "coco", "captions.json")
    data = [f"--config.data.data_dir={root / 'tfds'}", "--config.data.name=spec", f"--config.data.spec={spec}"]
    vq, codes = str(root / "vq"), str(root / "codes")
    assert cli.main(["train", "--config", VQ_CONFIG, "--workdir", vq, *data, *TINY_VQ,
                     "--config.train.steps=10", "--config.train.batch_size=16"]) == 0
    assert cli.main(["tokenize", "--workdir", vq, "--out", codes, "--batch-size", "20", "--quiet"]) == 0
    return data, vq, codes


@pytest.mark.slow
def test_a_caption_corpus_keeps_its_captions_and_trains_as_from_images(corpus_codes, tmp_path):
    data, vq, codes = corpus_codes
    tokenizer = mmjax.load(vq)
    info = image_codes.read_info(codes)
    assert info["dataset"] == "spec:coco_tiny" and info["splits"] == {"train": 48}
    config = tokenizer.config
    opened = sources.open_member(sources.members(config)[0], config, "train", progress=False)
    written = image_codes.data_source(codes, "train")
    decode, rng = pipeline.decode_transform(config), np.random.default_rng(0)
    for i in (0, 17, 47):
        record = written[i]
        original = opened.source[int(record["index"])]
        assert sorted(record["captions"]) == sorted(original["captions"]) and len(record["captions"]) == 2
        pixels = decode.random_map(original, rng)["image"] * 0.5 + 0.5  # the central crop, in [0, 1]
        np.testing.assert_array_equal(np.asarray(record["codes"]), tokenizer.encode_tokens(pixels[None]).ravel())
        assert record["label"] == -1

    corpus = [*data, "--config.eval.zeroshot=False"]
    assert _train_t2i(tmp_path / "images", data[0].split("=", 1)[1], vq, *corpus[1:]) == 0
    assert _train_t2i(tmp_path / "codes", data[0].split("=", 1)[1], vq, *corpus[1:],
                      f"--config.data.codes_dir={codes}") == 0
    from_images, from_codes = _losses(tmp_path / "images"), _losses(tmp_path / "codes")
    assert len(from_codes) == 4
    np.testing.assert_allclose([v for _, v in from_codes], [v for _, v in from_images], rtol=1e-5)
