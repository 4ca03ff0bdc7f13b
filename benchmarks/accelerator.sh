#!/usr/bin/env bash
# ViT-B/16 CLIP in bf16 on one accelerator: samples/s, TFLOP/s and MFU from `mmjax bench`, for a machine that
# has JAX for its accelerator but cannot reach a package registry (the image has jax, flax, optax, orbax, numpy,
# scipy, scikit-learn, einops, pillow, ... but not mmjax's other requirements).
#
#   bash benchmarks/accelerator.sh wheels          # here, with a registry: the missing wheels into .whl/
#   bash benchmarks/accelerator.sh run OUT_DIR     # there: installs .whl/ into /tmp/site, runs the benchmarks
#
# `wheels` fetches cp312 manylinux wheels (pass PYTHON_VERSION=3.11 etc. for another Python) of the packages
# below and their dependencies that such an image lacks, ~11 MB, and builds the one sdist-only package
# (promise) into a wheel. `run` times the real B/16 shape (configs/clip.py:B/16: bf16 compute, f32 master
# params, scanned layers) at two settings, each `mmjax bench` writing OUT_DIR/<name>.json:
#   b16_noremat: no rematerialisation, batch $NOREMAT_BATCH (default 256): the MFU of the step itself;
#   b16_dots:    remat='dots' (the config's default), batch $DOTS_BATCH (default 1024): MFU counts the
#                model's FLOPs only, so the recomputation lowers it.
# Extra `--config.KEY=VALUE` arguments after OUT_DIR go to every run.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  wheels)
    py=${PYTHON_VERSION:-3.12}
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # mmjax's requirements missing there, then theirs (each package's Requires-Dist, less what the image has).
    for p in ml-collections grain==0.2.18 tensorflow-datasets==4.9.10 array-record tensorboardX \
             dm-tree immutabledict simple-parsing termcolor toml tensorflow-metadata docstring-parser \
             googleapis-common-protos importlib_resources portpicker; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        "${platforms[@]}" -d .whl "$p"
    done
    python3 -m pip download -q --no-deps --no-binary=:all: -d .whl/sdist promise==2.3
    python3 -m pip wheel -q --no-deps -w .whl .whl/sdist/promise-2.3.tar.gz
    rm -rf .whl/sdist
    ls .whl
    du -sh .whl
    ;;
  run)
    out=${2:?usage: $0 run OUT_DIR [--config.KEY=VALUE ...]}
    shift 2
    mkdir -p "$out"
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site:$PWD
    else
      export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1
    python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
    config=${CONFIG:-configs/clip.py:B/16}
    python3 -m mmjax bench --config "$config" --steps "${STEPS:-20}" --warmup 3 --json "$out/b16_noremat.json" \
      --config.model.remat=none --config.train.batch_size="${NOREMAT_BATCH:-256}" "$@"
    python3 -m mmjax bench --config "$config" --steps "${STEPS:-20}" --warmup 3 --json "$out/b16_dots.json" \
      --config.model.remat=dots --config.train.batch_size="${DOTS_BATCH:-1024}" "$@"
    ;;
  *)
    echo "usage: $0 wheels | run OUT_DIR [--config.KEY=VALUE ...]" >&2
    exit 2
    ;;
esac
