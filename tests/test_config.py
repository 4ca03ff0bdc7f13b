"""Config loading, overrides and validation: bad input is reported before anything compiles."""

import os

import pytest

from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.training import preflight

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "tiny_config.py")
ROOT = os.path.dirname(HERE)


def tiny():
    return config_lib.load_config_file(TINY)


def test_every_shipped_config_loads_and_validates_on_8_devices(tmp_path):
    # pali_digits.py and flamingo_digits.py start from the workdirs of earlier runs (their argument names them):
    # here folders that exist, since a workdir to start from that does not exist is an error (next test).
    (tmp_path / "lm").mkdir(), (tmp_path / "vision").mkdir()
    args = {"flamingo_digits.py": f":{tmp_path / 'lm'},{tmp_path / 'vision'}", "pali_digits.py": f":{tmp_path / 'vision'}"}
    checked = set()
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".py"):
            c = config_lib.load_config_file(os.path.join(ROOT, "configs", name) + args.get(name, ""))
            preflight.check(c, num_devices=8)
            checked.add(name)
    assert set(args) <= checked


def test_init_from_workdirs_that_do_not_exist_are_named_unless_nothing_is_loaded(tmp_path):
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "flamingo_digits.py")
                                    + f":{tmp_path / 'no_lm'},{tmp_path / 'no_vision'}")
    with pytest.raises(ConfigError) as e:
        preflight.check(c, num_devices=8)
    assert [p.split(":")[0] for p in e.value.problems] == ["init_from.path", "init_from.more[0].path"]
    assert "no_lm" in e.value.problems[0] and "no_vision" in e.value.problems[1]
    preflight.check(c, num_devices=8, reads_init_from=False)  # what `mmjax compile` asks: shapes, no weights


def test_overrides_are_typed():
    c = config_lib.apply_overrides(tiny(), ["config.train.steps=200", "config.mesh.fsdp=2",
                                            "config.optim.lr=3e-4", "config.data.name=digits",
                                            "config.model.logit_bias_init=-10"])
    assert c.train.steps == 200 and c.mesh.fsdp == 2 and c.optim.lr == 3e-4
    assert c.model.logit_bias_init == -10.0


def test_unknown_override_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"train\.stepz.*did you mean 'train\.steps'"):
        config_lib.apply_overrides(tiny(), ["config.train.stepz=3"])


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import ml_collections\n"
                    "from mmjax.config import base_config\n"
                    "def get_config(arg=None):\n"
                    "    c = base_config().to_dict()\n"
                    "    c['optim']['learning_rate'] = 0.1\n"
                    "    return ml_collections.ConfigDict(c)\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        config_lib.load_config_file(str(path))


def test_wrong_type_override_names_key():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        config_lib.apply_overrides(tiny(), ["config.train.steps=lots"])


def test_batch_not_divisible_by_data_parallel_size():
    c = config_lib.apply_overrides(tiny(), ["config.train.batch_size=12", "config.mesh.data=8"])
    with pytest.raises(ConfigError, match=r"train.batch_size=12 is not divisible.*data\*fsdp=8"):
        preflight.check(c, num_devices=8)


def test_mesh_product_must_equal_device_count():
    c = config_lib.apply_overrides(tiny(), ["config.mesh.data=2", "config.mesh.fsdp=2",
                                            "config.mesh.tensor=1"])
    with pytest.raises(ConfigError, match="product is 8"):
        preflight.check(c, num_devices=8)


def test_all_problems_reported_together():
    c = config_lib.apply_overrides(tiny(), ["config.model.image.patch_size=5",
                                            "config.optim.warmup_steps=100",
                                            "config.model.loss=triplet"])
    with pytest.raises(ConfigError) as err:
        preflight.check(c, num_devices=1)
    text = str(err.value)
    for key in ("model.image.image_size", "optim.warmup_steps", "model.loss"):
        assert key in text


def test_minus_one_takes_the_rest():
    c = config_lib.apply_overrides(tiny(), ["config.mesh.data=-1", "config.mesh.fsdp=2",
                                            "config.mesh.tensor=2"])
    assert config_lib.resolve_mesh_shape(c.mesh, 8) == (2, 2, 2)


def test_workdir_config_finds_files_inside_a_moved_workdir(tmp_path, monkeypatch):
    """A relative tokenizer path in W/config.json names a file in W (what `mmjax convert` writes): loading
    resolves it wherever W now is; other relative paths stay relative to the current directory."""
    import json

    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "bpe_merges.txt").write_text("#version\n")
    config = config_lib.base_config()
    config.unlock()
    config.model.text.tokenizer_path = "bpe_merges.txt"
    (moved / "config.json").write_text(json.dumps(config.to_dict()))
    monkeypatch.chdir(tmp_path)  # not the workdir
    loaded = config_lib.load_workdir_config("moved")
    assert loaded.model.text.tokenizer_path == str(moved / "bpe_merges.txt")
    config.model.text.tokenizer_path = "elsewhere/tok.model"  # not in W: left for the current directory
    assert config_lib.load_workdir_config("moved", config.to_dict()).model.text.tokenizer_path == "elsewhere/tok.model"
    with pytest.raises(FileNotFoundError, match="'nowhere' is not an mmjax workdir"):
        config_lib.load_workdir_config("nowhere")


def test_zeroshot_templates_replace_the_datasets_and_need_one_placeholder():
    from mmjax.data import pipeline

    c = tiny()
    names, default = pipeline.zeroshot_prompts(c)
    c.eval.zeroshot_templates = ("a handwritten {}", "the number {} written by hand")
    assert pipeline.zeroshot_prompts(c) == (names, ["a handwritten {}", "the number {} written by hand"])
    assert default != ["a handwritten {}", "the number {} written by hand"]
    c.eval.zeroshot_templates = ("a handwritten digit",)
    with pytest.raises(ConfigError, match=r"eval.zeroshot_templates.*'a handwritten digit'"):
        preflight.check(c, num_devices=1)
