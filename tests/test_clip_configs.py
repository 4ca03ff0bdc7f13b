"""configs/clip.py: one parameterised real-shape config; the old per-shape files are aliases of its variants."""

import os

import pytest

from mmjax.cli import parse_command
from mmjax.config import load_config_file
from mmjax.training import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(ROOT, "configs", "clip.py")

# old file -> the clip.py variant it aliases
ALIASES = {
    "clip_vit_b32.py": "B/32",
    "clip_vit_b16.py": "B/16",
    "clip_vit_l14.py": "L/14",
    "siglip_b16.py": "B/16,loss=sigmoid",
}
VALID = ("B/32", "B/16", "L/14", "B/16,loss=sigmoid")


@pytest.mark.parametrize("old,arg", sorted(ALIASES.items()))
def test_alias_equals_variant(old, arg):
    alias = load_config_file(os.path.join(ROOT, "configs", old)).to_dict()
    variant = load_config_file(f"{CLIP}:{arg}").to_dict()
    assert alias == variant
    # the alias ignores an arg of its own
    assert load_config_file(os.path.join(ROOT, "configs", old), "L/14").to_dict() == variant


def test_variants_differ_in_shape():
    shapes = {}
    for arg in VALID:
        c = load_config_file(f"{CLIP}:{arg}")
        shapes[arg] = (c.model.loss, c.model.embed_dim, c.model.image.patch_size, c.model.image.width,
                       c.model.image.depth, c.model.text.max_len)
    assert shapes == {
        "B/32": ("softmax", 512, 32, 768, 12, 77),
        "B/16": ("softmax", 512, 16, 768, 12, 77),
        "L/14": ("softmax", 768, 14, 1024, 24, 77),
        "B/16,loss=sigmoid": ("sigmoid", 768, 16, 768, 12, 64),
    }


def test_default_variant_is_b16():
    assert load_config_file(CLIP).to_dict() == load_config_file(f"{CLIP}:B/16").to_dict()


def test_siglip_variant_has_sigmoid_loss_and_logit_bias():
    c = load_config_file(f"{CLIP}:B/16,loss=sigmoid")
    assert c.model.loss == "sigmoid"
    assert c.model.logit_bias_init == -10.0
    for arg in ("B/32", "B/16", "L/14"):
        c = load_config_file(f"{CLIP}:{arg}")
        assert c.model.loss == "softmax" and c.model.logit_bias_init is None


@pytest.mark.parametrize("bad", ["B/8", "H/14", "B/16,loss=triplet", "L/14,loss=sigmoid", "B/16,foo=1",
                                 "B/16,sigmoid"])
def test_unknown_variant_names_the_valid_ones(bad):
    with pytest.raises(ValueError) as err:
        load_config_file(f"{CLIP}:{bad}")
    text = str(err.value)
    assert repr(bad) in text
    for v in VALID:
        assert v in text


@pytest.mark.parametrize("arg", VALID)
@pytest.mark.parametrize("num_devices", [8, 128, 256])
def test_every_variant_validates(arg, num_devices):
    c = load_config_file(f"{CLIP}:{arg}")
    mesh = preflight.check(c, num_devices=num_devices)
    assert mesh[0] * mesh[1] * mesh[2] == num_devices
    assert c.train.batch_size % (mesh[0] * mesh[1]) == 0


@pytest.mark.parametrize("arg", VALID)
def test_compile_command_parses(arg, monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented commands use paths relative to the repository root
    args, config = parse_command(["compile", "--config", f"configs/clip.py:{arg}", "--topology", "v5p-8",
                                  "--config.mesh.data=1", "--config.mesh.fsdp=-1"])
    assert args.command == "compile" and args.topology == "v5p-8"
    expected = load_config_file(f"{CLIP}:{arg}")
    assert config.model.to_dict() == expected.model.to_dict()
    assert (config.mesh.data, config.mesh.fsdp) == (1, -1)


def test_train_command_parses_with_siglip_arg(monkeypatch):
    monkeypatch.chdir(ROOT)
    args, config = parse_command(["train", "--config", "configs/clip.py:B/16,loss=sigmoid", "--workdir",
                                  "/tmp/siglip_b16", "--config.train.batch_size=8"])
    assert config.model.loss == "sigmoid" and config.train.batch_size == 8
