"""mmjax: sharded multimodal contrastive pretraining in JAX/Flax.

    import mmjax
    model = mmjax.load("W")   # a training workdir -> encode_image / encode_text / logit_scale
"""

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None, devices=None):
    """Restores a trained workdir for inference; see `mmjax.inference.load`."""
    from mmjax.inference import load as _load

    return _load(workdir, step=step, devices=devices)
