"""Peak memory of contrastive loss + gradient: plain [B, B] losses against the chunked ring losses.

Run:  python benchmarks/loss_memory.py            (about 2-4 minutes on 2 busy CPU cores)
      python benchmarks/loss_memory.py --sizes 65536,1048576 --execute 4096,8192,16384 --devices 8 --chunk 1024

Two kinds of figures, both for ``jit(value_and_grad(loss))`` w.r.t. x, y, logit_scale (and logit_bias), float32:

1. Compiled memory analysis (``lower(...).compile().memory_analysis()``; nothing is run, so any B works): per device,
   ``temp`` = XLA's scratch buffers (the loss's own working memory: logits, exps, ring buffers, accumulators),
   ``args`` = x and y (+ scalars), ``out`` = loss and gradients (dx, dy have the size of x, y), ``total`` =
   args + out + temp - aliased. The plain loss on one device shows temp = 6 x B^2 x 4 bytes (softmax) / 3 x
   (sigmoid); the chunked loss is shown on 1 device and on the ``--devices`` fake CPU devices (mesh data=N, one
   ring), where each device holds B/N rows.
2. Measured peak RSS of executing the same compiled step once (fresh subprocess, 1 device, random normalised
   embeddings): the high-water mark (VmHWM, reset via /proc/self/clear_refs after inputs exist and compilation is
   done) minus the RSS just before the run, i.e. the memory the run itself added (temp + outputs). Only sizes that
   finish in seconds here are executed: the loss costs ~8 B^2 D flops, ~1e5 s at B=1,048,576 on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 2.0 ** 30
MIB = 2.0 ** 20
KINDS = ('softmax', 'sigmoid')


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dim', type=int, default=512)
    p.add_argument('--chunk', type=int, default=1024, help='chunk_size of the chunked losses')
    p.add_argument('--sizes', default='4096,16384,65536,1048576', help='global batches for the compiled analysis')
    p.add_argument('--execute', default='4096,8192,16384', help='global batches to run and measure RSS')
    p.add_argument('--devices', type=int, default=8, help='fake CPU devices for the ring analysis')
    p.add_argument('--max-plain-run-gib', type=float, default=2.0,
                   help='skip executing the plain loss when its compiled temp exceeds this')
    p.add_argument('--child', nargs=3, metavar=('IMPL', 'KIND', 'B'), help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse()
if ARGS.child is None:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={ARGS.devices}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from mmjax.losses import chunked as chunked_losses  # noqa: E402
from mmjax.losses import contrastive as losses
from mmjax.runtime.sharding import batch_sharding, make_mesh  # noqa: E402

SCALARS = {'softmax': (10.0,), 'sigmoid': (10.0, -10.0)}


def _mesh(n):
    return make_mesh(ml_collections.ConfigDict(dict(data=n, fsdp=1, tensor=1)), jax.devices()[:n])


def _loss_fn(impl, kind, mesh, chunk):
    if impl == 'plain':
        fn = losses.softmax_contrastive_loss if kind == 'softmax' else losses.sigmoid_contrastive_loss
    elif kind == 'softmax':
        fn = lambda x, y, t: chunked_losses.chunked_softmax_contrastive_loss(x, y, t, mesh=mesh, chunk_size=chunk)
    else:
        fn = lambda x, y, t, b: chunked_losses.chunked_sigmoid_contrastive_loss(x, y, t, b, mesh=mesh,
                                                                                 chunk_size=chunk)
    n_args = 2 + len(SCALARS[kind])
    return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], argnums=tuple(range(n_args))))


def _compile(impl, kind, batch, n_devices):
    mesh = _mesh(n_devices)
    sharding = batch_sharding(mesh) if impl == 'chunked' else None
    emb = jax.ShapeDtypeStruct((batch, ARGS.dim), jnp.float32, sharding=sharding)
    scalars = (jax.ShapeDtypeStruct((), jnp.float32),) * len(SCALARS[kind])
    return _loss_fn(impl, kind, mesh, ARGS.chunk).lower(emb, emb, *scalars).compile()


def _analysis_row(impl, kind, batch, n_devices):
    t0 = time.perf_counter()
    m = _compile(impl, kind, batch, n_devices).memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return dict(impl=impl, kind=kind, B=batch, devices=n_devices, temp=m.temp_size_in_bytes,
                args=m.argument_size_in_bytes, out=m.output_size_in_bytes, total=total,
                compile_s=time.perf_counter() - t0)


def _rss_bytes(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def _child(impl, kind, batch):
    """Runs one loss+grad step on 1 device and prints a JSON line with the RSS it added."""
    compiled = _compile(impl, kind, batch, 1)
    keys = jax.random.split(jax.random.key(0), 2)
    x, y = (jax.random.normal(k, (batch, ARGS.dim), jnp.float32) for k in keys)
    x, y = (v / jnp.linalg.norm(v, axis=1, keepdims=True) for v in (x, y))
    scalars = tuple(jnp.float32(s) for s in SCALARS[kind])
    jax.block_until_ready((x, y))
    with open('/proc/self/clear_refs', 'w') as f:  # resets VmHWM to the current RSS
        f.write('5')
    before = _rss_bytes('VmRSS')
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(x, y, *scalars))
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(impl=impl, kind=kind, B=batch, added_rss=_rss_bytes('VmHWM') - before, run_s=seconds)))


def _run_child(impl, kind, batch):
    env = dict(os.environ, XLA_FLAGS='')
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--dim', str(ARGS.dim), '--chunk',
                          str(ARGS.chunk), '--child', impl, kind, str(batch)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(nbytes):
    return f'{nbytes / GIB:10.3f} GiB' if nbytes >= GIB else f'{nbytes / MIB:10.1f} MiB'


def main():
    sizes = [int(s) for s in ARGS.sizes.split(',') if s]
    execute = [int(s) for s in ARGS.execute.split(',') if s]
    print(f'# compiled memory analysis of jit(value_and_grad(loss)), d={ARGS.dim}, float32, '
          f'chunk_size={ARGS.chunk}; per-device bytes (never executed)')
    header = (f'{"kind":8} {"impl":8} {"B":>9} {"devs":>4} {"temp":>14} {"args":>14} {"out":>14} {"total":>14} '
              f'{"temp/(4B^2)":>12}')
    print(header)
    rows = []
    for kind in KINDS:
        for batch in sizes:
            layouts = [('plain', 1), ('chunked', 1)] + ([('chunked', ARGS.devices)] if ARGS.devices > 1 else [])
            for impl, n in layouts:
                if batch % (n * ARGS.chunk):
                    continue
                r = _analysis_row(impl, kind, batch, n)
                rows.append(r)
                print(f'{kind:8} {impl:8} {batch:>9} {n:>4} {_fmt(r["temp"])} {_fmt(r["args"])} {_fmt(r["out"])} '
                      f'{_fmt(r["total"])} {r["temp"] / (4.0 * batch * batch):12.2e}', flush=True)

    print('\n# measured: RSS added by executing the step once on 1 device (VmHWM - RSS before the run)')
    print(f'{"kind":8} {"impl":8} {"B":>9} {"added RSS":>14} {"compiled temp+out":>18} {"run s":>8}')
    for kind in KINDS:
        for batch in execute:
            for impl in ('plain', 'chunked'):
                if batch % ARGS.chunk and impl == 'chunked':
                    continue
                m = _compile(impl, kind, batch, 1).memory_analysis()
                if impl == 'plain' and m.temp_size_in_bytes > ARGS.max_plain_run_gib * GIB:
                    print(f'{kind:8} {impl:8} {batch:>9}   (skipped: compiled temp {_fmt(m.temp_size_in_bytes)})')
                    continue
                r = _run_child(impl, kind, batch)
                print(f'{kind:8} {impl:8} {batch:>9} {_fmt(r["added_rss"])} '
                      f'{_fmt(m.temp_size_in_bytes + m.output_size_in_bytes):>18} {r["run_s"]:8.2f}', flush=True)


if __name__ == '__main__':
    if ARGS.child is not None:
        impl, kind, batch = ARGS.child
        _child(impl, kind, int(batch))
    else:
        main()
