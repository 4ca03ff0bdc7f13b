"""SigLIP ViT-B/16: an alias of `configs/clip.py:B/16,loss=sigmoid` (see that file for shapes, meshes and commands)."""

import os

from mmjax.config import load_config_file


def get_config(arg=None):
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip.py"), "B/16,loss=sigmoid")
