"""Configuration: defaults, loading `get_config(arg)` files and `--config.KEY=VALUE` overrides, validation.

    from mmjax.config import base_config      # what every configs/*.py starts from

- `defaults.py`: `base_config()`, every key with its default, and the constants other modules import;
- `loading.py`: config files, overrides, the config saved in a workdir (unknown keys reported with the nearest
  valid one);
- `validation.py`: every problem knowable without reading files, each naming its key.
This package imports nothing else of mmjax but `mmjax.errors`.
"""

from mmjax.config.defaults import (
                                   ACTIVATIONS,
                                   AUDIO_DATASETS,
                                   BOS_ID,
                                   DEFAULT_RULES,
                                   DTYPES,
                                   EOT_ID,
                                   EVAL_FIELDS,
                                   EVALUATOR_NEEDS,
                                   FINETUNE_MODES,
                                   FUSION_BACKBONES,
                                   FUSION_MODES,
                                   MESH_AXES,
                                   MODALITIES,
                                   PAD_ID,
                                   SPECIAL_TOKEN_IDS,
                                   base_config,
                                   data_dir,
                                   default_data_dir,
                                   model_towers,
)
from mmjax.config.loading import apply_overrides, conform, load_config_file, load_workdir_config, split_overrides
from mmjax.config.validation import resolve_mesh_shape, validate
from mmjax.errors import ConfigError

__all__ = [
    "ACTIVATIONS", "AUDIO_DATASETS", "BOS_ID", "DEFAULT_RULES", "EOT_ID", "PAD_ID", "DTYPES", "EVAL_FIELDS", "EVALUATOR_NEEDS", "FINETUNE_MODES",
    "FUSION_BACKBONES", "FUSION_MODES", "MESH_AXES", "MODALITIES", "SPECIAL_TOKEN_IDS", "ConfigError", "apply_overrides", "base_config",
    "conform", "data_dir", "default_data_dir", "load_config_file", "load_workdir_config", "model_towers", "resolve_mesh_shape",
    "split_overrides", "validate",
]
