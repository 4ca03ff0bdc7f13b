"""open_clip -> mmjax conversion: embeddings of converted tiny random models equal open_clip's.

Needs the `openclip` extra (torch, open-clip-torch, safetensors); those tests skip without it. The config
checks at the bottom need neither.
"""

import json
import os
import shutil

import numpy as np
import pytest

import mmjax
from mmjax import cli
from mmjax.interop.open_clip import ConversionError, config_from_open_clip, convert_state_dict

# Two tiny towers-apart models. A: OpenAI-style (QuickGELU), the suggested shape. B: different widths and
# heads for the two towers, an open_clip CustomTextCLIP ('text.' keys) with a SigLIP-style logit_bias.
TINY_A = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2}}
TINY_B = {"embed_dim": 24, "custom_text": True, "init_logit_bias": -10.0,
          "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 16, "head_width": 16,
                         "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 12, "vocab_size": 700, "width": 32, "heads": 2, "layers": 1,
                       "mlp_ratio": 3.0}}
TOL = 1e-4

pytest_plugins = ["storage_servers"]  # gs_bucket: a converted workdir written to a bucket


def _open_clip():
    torch = pytest.importorskip("torch", reason="open_clip reference needs torch (pip install -e '.[openclip]')")
    pytest.importorskip("safetensors", reason="needs safetensors (pip install -e '.[openclip]')")
    # The torchvision wheel next to a CPU torch may lack its compiled ops; open_clip only needs torchvision's
    # Python parts, whose import registers fake kernels for these two.
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    open_clip = pytest.importorskip("open_clip", reason="needs open-clip-torch (pip install -e '.[openclip]')")
    return torch, open_clip


def _reference(cfg: dict, seed: int, log_scale: float = 2.5):
    """A random open_clip model for `cfg` (every parameter perturbed, so no bias is 0 and no LN is 1)."""
    torch, open_clip = _open_clip()
    from open_clip.model import CLIP, CustomTextCLIP

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    model = (CustomTextCLIP if cfg.get("custom_text") else CLIP)(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim:
                p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(log_scale)
    return torch, model


def _save(torch, model, tmp_path, fmt: str) -> str:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = str(tmp_path / "model.safetensors")
        save_file(sd, path)
    else:
        path = str(tmp_path / "model.pt")
        torch.save(sd, path)
    return path


def _convert(tmp_path, cfg: dict, ckpt: str, *extra: str) -> str:
    cfg_path = str(tmp_path / "oc_config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    workdir = str(tmp_path / "W")
    rc = cli.main(["convert", "open_clip", "--model-config", cfg_path, "--checkpoint", ckpt, "--workdir", workdir,
                   *extra])
    assert rc == 0
    return workdir


def _raw_tokens(cfg: dict, n: int, seed: int) -> np.ndarray:
    """[SOT, ids..., EOT, 0...] in open_clip's ids (SOT = V-2, EOT = V-1, the largest)."""
    vocab, ctx = cfg["text_cfg"]["vocab_size"], cfg["text_cfg"]["context_length"]
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, ctx), np.int32)
    for i in range(n):
        length = int(rng.integers(0, ctx - 1))
        tokens[i, : length + 2] = [vocab - 2, *rng.integers(1, vocab - 2, length), vocab - 1]
    return tokens


def _oc_text(torch, model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True).numpy()


def _oc_image(torch, model, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return model.encode_image(x, normalize=True).numpy()


@pytest.mark.parametrize("cfg,fmt,seed,scan,log_scale", [(TINY_A, "safetensors", 0, False, 2.5),
                                                          (TINY_B, "pt", 1, True, 5.0)],
                         ids=["A-safetensors", "B-pt-scan"])
def test_converted_embeddings_match_open_clip(tmp_path, cfg, fmt, seed, scan, log_scale):
    torch, ref = _reference(cfg, seed, log_scale)
    extra = ("--text-ids", "raw") + (("--scan-layers",) if scan else ())
    workdir = _convert(tmp_path, cfg, _save(torch, ref, tmp_path, fmt), *extra)
    loaded = mmjax.load(workdir)
    assert loaded.config.model.activation == ("quick_gelu" if cfg.get("quick_gelu") else "gelu")
    assert loaded.config.model.scan_layers == scan
    loaded.encoder.batch_size = 6

    images = np.random.default_rng(seed).normal(size=(6, 32, 32, 3)).astype(np.float32)
    got, want = loaded.encoder.encode_image(images), _oc_image(torch, ref, images)
    assert np.abs(got - want).max() <= TOL

    tokens = _raw_tokens(cfg, 6, seed)
    got, want = loaded.encoder.encode_text(tokens), _oc_text(torch, ref, tokens)
    assert np.abs(got - want).max() <= TOL

    # B's temperature exceeds open_clip's training clamp (exp 5 > 100), as SigLIP ports do: kept, not clipped
    assert loaded.logit_scale == pytest.approx(np.exp(log_scale), rel=1e-6)
    if "init_logit_bias" in cfg:
        assert loaded.logit_bias == pytest.approx(float(ref.logit_bias.detach()), rel=1e-6)
        assert loaded.config.model.loss == "sigmoid"


def test_clip_bpe_ids_and_strings(tmp_path):
    """Default text ids: mmjax.load(W) on strings == open_clip on the same tokens in open_clip's ids;
    images through mmjax's own preprocessing."""
    torch, ref = _reference(TINY_A, 2)
    from open_clip import tokenizer as oc_tokenizer

    bpe = os.path.join(os.path.dirname(oc_tokenizer.__file__), "bpe_simple_vocab_16e6.txt.gz")
    workdir = _convert(tmp_path, TINY_A, _save(torch, ref, tmp_path, "safetensors"), "--bpe-path", bpe)
    loaded = mmjax.load(workdir)
    assert loaded.config.model.text.tokenizer == "clip_bpe"
    assert loaded.tokenizer.vocab_size == TINY_A["text_cfg"]["vocab_size"] + 1
    texts = ["a photo of a cat", "the number seven", "!!", ""]
    loaded.encoder.batch_size = len(texts)
    ids = loaded.tokenizer.encode(texts)
    vocab = TINY_A["text_cfg"]["vocab_size"]
    oc_ids = np.where(ids >= 3, ids - 3, np.choose(np.minimum(ids, 2), [0, vocab - 2, vocab - 1]))
    assert np.abs(loaded.encode_text(texts) - _oc_text(torch, ref, oc_ids)).max() <= TOL

    images = np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    want = _oc_image(torch, ref, loaded.preprocess(images))
    assert np.abs(loaded.encode_image(images) - want).max() <= TOL

    # The workdir names its merges file relative to itself: moved elsewhere, it loads and encodes the same.
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["text"]["tokenizer_path"] == "bpe_merges.txt"
    moved = str(tmp_path / "copied" / "converted")
    shutil.move(workdir, moved)
    again = mmjax.load(moved)
    again.encoder.batch_size = len(texts)
    np.testing.assert_array_equal(again.encode_text(texts), loaded.encode_text(texts))


def test_full_clip_vocab_matches_open_clip_tokenizer(tmp_path):
    """With CLIP's whole vocabulary, mmjax's tokenizer + converted table == open_clip.tokenize + its model."""
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch, ref = _reference(cfg, 3)
    import open_clip

    workdir = _convert(tmp_path, cfg, _save(torch, ref, tmp_path, "pt"))  # default: clip_bpe, bundled merges
    loaded = mmjax.load(workdir)
    texts = ["a photo of a dog.", "Two PEOPLE riding bikes, at night!", "café 42"]
    loaded.encoder.batch_size = len(texts)
    want = _oc_text(torch, ref, open_clip.tokenize(texts, context_length=20).numpy())
    assert np.abs(loaded.encode_text(texts) - want).max() <= TOL


def test_eval_command_runs_on_converted_workdir(tmp_path):
    torch, ref = _reference(TINY_A, 4)
    workdir = _convert(tmp_path, TINY_A, _save(torch, ref, tmp_path, "safetensors"), "--text-ids", "raw")
    here = os.path.dirname(__file__)
    rc = cli.main(["eval", "--config", os.path.join(here, "tiny_config.py"), "--workdir", workdir, "--quiet",
                   "--no-plots"])
    assert rc == 0
    with open(os.path.join(workdir, "eval", "0.json")) as f:
        metrics = json.load(f)
    assert 0.0 <= metrics["zeroshot/top1"] <= 1.0 and "linear_probe/top1" in metrics


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    torch, ref = _reference(TINY_A, 5)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    config = config_from_open_clip(TINY_A)
    del sd["visual.proj"], sd["transformer.resblocks.1.mlp.c_fc.bias"]
    sd["visual.attn_pool.query"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, config)
    msg = str(e.value)
    assert "2 missing keys" in msg and "visual.proj" in msg and "transformer.resblocks.1.mlp.c_fc.bias" in msg
    assert "1 unexpected keys: visual.attn_pool.query" in msg


def test_wrong_shape_is_reported(tmp_path):
    torch, ref = _reference(TINY_A, 6)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    sd["visual.positional_embedding"] = sd["visual.positional_embedding"][:-1]
    with pytest.raises(ConversionError, match=r"image/encoder/pos_embed: converted \(16, 64\) vs mmjax \(17, 64\)"):
        convert_state_dict(sd, config_from_open_clip(TINY_A))


def test_cli_reports_unsupported_option(tmp_path, capsys):
    cfg = json.loads(json.dumps(TINY_A))
    cfg["vision_cfg"]["attentional_pool"] = True
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "x.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    rc = cli.main(["convert", "open_clip", "--model-config", str(cfg_path), "--checkpoint",
                   str(tmp_path / "x.safetensors"), "--workdir", str(tmp_path / "W"), "--text-ids", "raw"])
    assert rc == 2
    assert "vision_cfg.attentional_pool=True is not supported" in capsys.readouterr().err
    assert not (tmp_path / "W").exists()


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "no_ln_pre", True), ("vision_cfg", "pool_type", "avg"), ("vision_cfg", "layers", [3, 4, 6, 3]),
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224"), ("vision_cfg", "image_size", [224, 160]),
    ("text_cfg", "pad_id", 1), ("text_cfg", "proj_bias", True), ("text_cfg", "no_causal_mask", True),
    ("text_cfg", "pool_type", "last"), ("text_cfg", "embed_cls", True), ("text_cfg", "norm_kwargs", {"eps": 1e-6}),
    ("text_cfg", "hf_model_name", "bert-base-uncased"), ("vision_cfg", "some_new_option", 1),
])
def test_unsupported_options_are_named(section, key, value):
    cfg = json.loads(json.dumps(TINY_A))
    cfg[section][key] = value
    with pytest.raises(ConversionError, match=f"{section}.{key}"):
        config_from_open_clip(cfg)


def test_unknown_top_level_key_and_config_fields():
    with pytest.raises(ConversionError, match="multimodal_cfg"):
        config_from_open_clip({**TINY_A, "multimodal_cfg": {"width": 64}})
    c = config_from_open_clip(TINY_A, text_ids="raw")
    m = c.model
    assert (m.image.num_heads, m.image.mlp_dim, m.text.num_heads, m.text.vocab_size) == (4, 256, 4, 1000)
    assert m.activation == "quick_gelu" and m.logit_bias_init is None and m.text.tokenizer == "bytes"
    b = config_from_open_clip(TINY_B, text_ids="clip_bpe")
    assert b.model.text.vocab_size == 701 and b.model.text.tokenizer == "clip_bpe" and b.model.loss == "sigmoid"
    assert (b.model.image.num_heads, b.model.image.mlp_dim, b.model.text.mlp_dim) == (3, 96, 96)


def test_convert_writes_a_workdir_to_a_bucket(tmp_path, gs_bucket, monkeypatch):
    """`mmjax convert open_clip --workdir gs://...`: the workdir (checkpoint 0, config.json) lands on the bucket and
    loads from it with the embeddings of a local conversion; no local folder named `gs:`."""
    import mmjax
    from mmjax import storage

    monkeypatch.chdir(tmp_path)
    torch, ref = _reference(TINY_A, 4)
    ckpt = _save(torch, ref, tmp_path, "safetensors")
    local = _convert(tmp_path, TINY_A, ckpt, "--text-ids", "raw")
    remote = storage.join(gs_bucket, "converted")
    assert cli.main(["convert", "open_clip", "--model-config", str(tmp_path / "oc_config.json"), "--checkpoint", ckpt,
                     "--workdir", remote, "--text-ids", "raw"]) == 0
    assert storage.exists(storage.join(remote, "config.json")) and "0" in storage.listdir(storage.join(remote, "checkpoints"))
    tokens = _raw_tokens(TINY_A, 3, 0)
    a, b = mmjax.load(local), mmjax.load(remote)
    np.testing.assert_array_equal(a.encoder.encode_text(tokens), b.encoder.encode_text(tokens))
    assert not (tmp_path / "gs:").exists()
