"""SigLIP ViT-B/16: an alias of `configs/clip.py:B/16,loss=sigmoid` (see that file for shapes, meshes and commands)."""

import importlib.util
import os


def _clip():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip.py")
    spec = importlib.util.spec_from_file_location("mmjax_configs_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    return _clip().get_config("B/16,loss=sigmoid")
