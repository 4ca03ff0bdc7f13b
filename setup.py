"""mmjax: sharded multimodal contrastive pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Sharded multimodal (image/text/audio) pretraining in JAX/Flax",
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
        "matplotlib>=3.8",  # mmjax eval figures
        "tqdm>=4.60",  # progress bars (eval, dataset preparation)
        "regex>=2023",  # CLIP BPE tokenizer
        # object stores: etils.epath (the path layer Orbax uses) reaches gs:// through gcsfs and s3:// through s3fs;
        # s3fs and gcsfs pin fsspec to their own release, and an unpinned s3fs can resolve to a 2020 release
        "etils[epath]>=1.15",
        "gcsfs>=2026.9",
        "s3fs>=2026.9",
        # the workdir lock on buckets: conditional writes (GCS ifGenerationMatch, S3 If-None-Match / If-Match)
        "google-cloud-storage>=3.14",
        "boto3>=1.35",
        # captioning metrics of `mmjax eval` (BLEU-4, CIDEr-D, ROUGE-L scorers; pure Python, no Java needed)
        "pycocoevalcap>=1.2",
    ],
    extras_require={
        # librosa: reference for the JAX log-mel; sentencepiece/tokenizers: the file tokenizers; pytest-xdist: the
        # suite runs in 2 processes (pytest.ini), since XLA compiles on one core; pytest-timeout: a test that hangs
        # fails (pytest.ini) instead of holding the run until CI's cap; import-linter and ruff: the
        # layering contracts (.importlinter) and lint rules (ruff.toml) that tests/test_layout.py runs
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2.3", "librosa>=0.10", "sentencepiece>=0.2",
                 "tokenizers>=0.19", "import-linter>=2.1", "ruff>=0.6",
                 # object-store servers the tests start on 127.0.0.1 (tests/storage_servers.py): the emulator is
                 # pinned exactly because the tests' wrapper adds behaviours Orbax needs to its request handlers
                 "gcp-storage-emulator==2026.7.19", "moto[server]>=5.2.1,<6", "boto3", "google-cloud-storage>=3.14",
                 # `mmjax prepare --runner DirectRunner` and the img2dataset end-to-end test (tests/test_img2dataset.py)
                 "apache-beam>=2.77", "img2dataset>=1.47"],
        # `mmjax prepare` on Apache Beam; for Dataflow install "apache-beam[gcp]" instead
        "beam": ["apache-beam>=2.77"],
        "text": ["sentencepiece>=0.2", "tokenizers>=0.19"],
        "tpu": ["libtpu==0.0.42.*"],  # for `mmjax compile` (AOT for TPU topologies); pinned by jax 0.10.2
        # `mmjax convert open_clip` reads weights without torch; this extra is its test reference. Install with
        # `-c .ci/constraints.txt` (as `make install` does) so pip keeps the CPU torch wheel.
        # transformers: open_clip CoCa's `generate` (the reference of the CoCa parity test and benchmarks/decoding.py)
        "openclip": ["torch==2.13.0", "open-clip-torch>=3.0", "safetensors>=0.4",
                     "transformers>=4.45,<4.56"],  # 4.56+ dropped the BeamSearchScorer open_clip's generate uses
    },
    entry_points={"console_scripts": ["mmjax=mmjax.cli:run"]},
)
