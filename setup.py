"""mmjax: sharded multimodal contrastive pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Sharded multimodal (image/text/audio) contrastive pretraining in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "einops>=0.8",
        "ml-collections>=1.1",
        "numpy>=2.0",
        "pillow>=10",
        "scikit-learn>=1.5",  # ships the embedded digits dataset
        "scipy>=1.11",  # audio resampling
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "librosa>=0.10"],  # librosa: reference for the JAX log-mel
    },
    entry_points={"console_scripts": ["mmjax=mmjax.cli:main"]},
)
