"""mmjax: sharded multimodal pretraining in JAX/Flax.

    import mmjax
    model = mmjax.load("W")   # a training workdir -> encode_image / encode_text / logit_scale
"""

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None, devices=None):
    """Restores a trained workdir for inference; see `mmjax.inference.load`."""
    # Imported on first use: `import mmjax.config` (config files, grain workers) stays free of JAX and Orbax.
    from mmjax.inference import load as _load

    return _load(workdir, step=step, devices=devices)
