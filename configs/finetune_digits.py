"""Downstream task: the demo CLIP (configs/demo.py, English captions) fine-tuned to French digit captions.

The images are the embedded digits; training captions and zero-shot prompts are French (data.captions =
'french': 'le chiffre sept écrit à la main', 'un huit pixelisé', ...). The English-trained model has never
read the French number words, so zero-shot top-1 against the French prompts measures how well each
fine-tuning mode adapts it. `get_config(mode)`: mode is one of mmjax.config.FINETUNE_MODES.

Run (first train the demo checkpoint, about 6-15 min on 2 CPU cores):
    mmjax train --config configs/demo.py --workdir /tmp/demo_ft
    mmjax train --config configs/finetune_digits.py:lora --workdir /tmp/ft_lora \
        --config.init_from.path=/tmp/demo_ft

Expected: the log reports the trainable fraction and the init_from report (loaded 79 tensors from the demo,
newly initialised the 48 LoRA factors), then 100 steps (3.5-5 min wall, 90-130 CPU s on 2 shared cores).
Zero-shot top-1 on the 360 held-out images against the French prompts, measured: demo checkpoint as is 0.24;
linear_probe 0.49, prompt 0.39, adapter 0.67, locked_image 0.88, full 0.94, lora 0.97 (README, "Fine-tuning").
"""

import importlib.util
import os

from mmjax.config import FINETUNE_MODES

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def _demo_config():
    spec = importlib.util.spec_from_file_location("mmjax_demo_config", _DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(mode="lora"):
    if mode not in FINETUNE_MODES:
        raise ValueError(f"configs/finetune_digits.py: unknown mode {mode!r}; choose one of {FINETUNE_MODES}")
    c = _demo_config()  # the same model as the demo, so its checkpoint loads
    c.data.captions = "french"
    c.finetune.mode = mode
    c.finetune.towers = ("image", "text")
    c.finetune.adapter_dim = 16
    c.finetune.prompt_len = 8
    c.finetune.lora_rank = 4
    c.finetune.lora_alpha = 8.0
    c.finetune.lora_targets = "attn/(query|key|value|out)|mlp/(fc_in|fc_out)"
    c.init_from.path = ""  # give the demo workdir: --config.init_from.path=/tmp/demo_ft

    # Fewer, cheaper steps than pretraining; the modes that train few parameters take a larger learning
    # rate, prompts the largest (prompt tuning commonly uses 1e-2 .. 0.3).
    c.train.steps = 100
    c.train.batch_size = 128
    c.train.log_every = 25
    c.checkpoint.every_steps = 100
    c.optim.warmup_steps = 10
    c.optim.decay = "cosine"
    c.optim.lr = {"full": 5e-4, "locked_image": 5e-4, "none": 5e-4, "prompt": 3e-2}.get(mode, 3e-3)
    return c
