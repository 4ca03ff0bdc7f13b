"""mmjax's train step against open_clip's on the same shape, batch and precision, in alternating runs.

Run (needs the optional extra: pip install -e '.[openclip]' -c .ci/constraints.txt):
    python benchmarks/vs_open_clip.py                       # ViT-B-32, batch 32, f32, all cores
    python benchmarks/vs_open_clip.py --rounds 5 --steps 4 --json out.json

Both steps are the whole training step: forward of both towers, symmetric InfoNCE with learned temperature,
backward, global-norm clipping at 1.0 and AdamW (lr 5e-4, wd 0.2, betas 0.9/0.98, eps 1e-6). mmjax runs the
step of `mmjax bench` (`mmjax.commands.bench.StepTimer`: built as `mmjax train` builds it) on configs/clip_vit_b32.py
(f32, no remat, unscanned, one device = all cores); open_clip runs `open_clip.create_model('ViT-B-32')`
(random init) with `open_clip.loss.ClipLoss` and `torch.optim.AdamW`, `torch.set_num_threads(<cores>)`. Each
round times `--steps` steps of mmjax, then of open_clip (after warm-up steps that are not timed); the figures
are the medians over rounds. Model FLOPs come from `mmjax.runtime.flops.train_flops_per_example`, for each side what
it computes (mmjax's last blocks compute the pooled token only, open_clip's every token); the matmul peak is a
float32 matmul measured in the same process (`mmjax.runtime.flops.measure_matmul_flops`) at the start of every round,
and each side's fraction of peak is the median over rounds of its GFLOP/s over that round's peak (a shared
machine's speed drifts between minutes: probes here read anywhere from 100 to 174 GFLOP/s). Like `mmjax
train`, the script adds mmjax's CPU defaults (`mmjax.runtime.flops`): XLA flags for mmjax's step, and the glibc malloc
tunable for the whole process, so open_clip's step runs with it too (MMJAX_XLA_CPU_DEFAULTS=1: neither).

In every round each side first runs `--settle` untimed steps (default 1). On a virtual machine the first step
after a few idle seconds is slower than the next ones: XLA:CPU takes a step's temporaries as one block, which
glibc maps fresh and unmaps when the step ends, and memory left free for seconds is handed back to the
hypervisor, so touching it again costs host-side faults (measured on a 2-core KVM guest: 8.3 s back to back,
10.5-11 s after 6-12 s idle, the extra 4-5 s all system time). While open_clip runs its steps, mmjax's
temporaries sit free for that long, so without the settling step every round would time mmjax's first step
after such a pause, which training, whose steps run back to back, never sees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # runnable from a checkout without installing mmjax
    sys.path.insert(0, ROOT)


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (its shape is used for both)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=None,
                   help="depth of both towers on both sides (default: the model's 12); fewer layers keep "
                        "the per-layer shapes and make quick comparisons cheaper. Use >= 2: at 1, mmjax's only "
                        "block is its pooled-only last block, so the sides no longer do comparable work")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps before each side's timed steps in every round, so both are timed in the "
                        "steady state of back-to-back training steps (see the module docstring); 0: time the "
                        "first step after the other side too")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", choices=("mmjax", "open_clip"), default=None, help="run one side only")
    p.add_argument("--override", action="append", default=[],
                   help="extra mmjax config override, e.g. --override config.model.activation=gelu_tanh")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of each step: image tower forward, text tower forward, forward + "
                        "backward of the loss, optimizer update (where the time goes)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    for name, least in (("rounds", 1), ("steps", 1), ("warmup", 0), ("settle", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name}={getattr(args, name)} must be at least {least}")
    return args


def mmjax_step(batch: int, overrides, layers: int | None = None):
    """(run(n) -> seconds for n steps, config, parts) for mmjax's train step on one CPU device: the step of
    `mmjax bench` (`mmjax.commands.bench.StepTimer`, built as `mmjax train` builds it) on a fixed synthetic batch."""
    import jax

    from mmjax import config as config_lib
    from mmjax.commands import bench
    from mmjax.tasks import make_objective

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "clip_vit_b32.py"))
    config = config_lib.apply_overrides(config, [
        f"config.train.batch_size={batch}", "config.model.dtype=float32", "config.model.remat=none",
        "config.model.scan_layers=False", "config.mesh.data=1", "config.mesh.fsdp=1",
        "config.optim.warmup_steps=10",
        *([f"config.model.image.depth={layers}", f"config.model.text.depth={layers}"] if layers else []),
        *overrides])
    timer = bench.StepTimer(config, jax.devices()[:1])
    factory, mesh, device_batch = timer.factory, timer.mesh, timer.batch

    def parts():
        """{part: seconds for one call}: forward of each tower, loss forward + backward, optimizer update."""
        import optax

        params = timer.state.params
        model = factory.model
        fns = {
            "image forward": jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image")),
            "text forward": jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text")),
        }
        objective = make_objective(config, mesh)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: objective(model, p, b, 0), has_aux=True))
        args = {"image forward": device_batch["image"], "text forward": device_batch["text"]}
        out = {}
        with jax.set_mesh(mesh):
            for name, fn in fns.items():
                jax.block_until_ready(fn(params, args[name]))
                out[name] = _best(lambda fn=fn, name=name: jax.block_until_ready(fn(params, args[name])))
            jax.block_until_ready(grad_fn(params, device_batch))
            out["loss forward+backward"] = _best(lambda: jax.block_until_ready(grad_fn(params, device_batch)))
            _, grads = grad_fn(params, device_batch)

            @jax.jit
            def update(p, g, s):
                u, s = factory.tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            opt_state = timer.state.opt_state
            jax.block_until_ready(update(params, grads, opt_state))
            out["optimizer update"] = _best(lambda: jax.block_until_ready(update(params, grads, opt_state)))
        return out

    return timer.run, config, parts


def _best(fn, repeats: int = 2) -> float:
    """Shortest wall time of `repeats` calls of fn()."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _import_open_clip():
    """open_clip imports torchvision, whose compiled ops may not match the CPU torch wheel; its import only
    registers fake kernels for `nms` and `qnms`, so those two are defined first when missing."""
    import torch

    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import open_clip

    return torch, open_clip


def open_clip_step(name: str, batch: int, threads: int, layers: int | None = None):
    torch, open_clip = _import_open_clip()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    if layers:
        cfg = open_clip.get_model_config(name)
        cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = layers
        model = open_clip.model.CLIP(**cfg)
    else:
        model = open_clip.create_model(name)
    model.train()
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    text = torch.randint(1, 49000, (batch, model.context_length))
    text[:, -1] = 49407

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            image_f, text_f, scale = model(images, text)[:3]  # normalised features, exp(logit_scale)
            loss = loss_fn(image_f, text_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return time.perf_counter() - t0

    def parts():
        out = {}
        with torch.no_grad():
            model.encode_image(images)
            out["image forward"] = _best(lambda: model.encode_image(images))
            model.encode_text(text)
            out["text forward"] = _best(lambda: model.encode_text(text))

        def fwd_bwd():
            image_f, text_f, scale = model(images, text)[:3]
            opt.zero_grad(set_to_none=True)
            loss_fn(image_f, text_f, scale).backward()

        fwd_bwd()
        out["loss forward+backward"] = _best(fwd_bwd)

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        out["optimizer update"] = _best(update)
        return out

    return run, parts


def main() -> int:
    args = _parse()
    os.environ["JAX_PLATFORMS"] = "cpu"
    from mmjax.runtime import cpu  # after argparse: `--help` stays fast
    from mmjax.runtime import flops as speed

    # What `mmjax train` runs with (MMJAX_XLA_CPU_DEFAULTS=1: without). The malloc tunable applies to the whole
    # process, so open_clip's step runs with it too and the comparison stays like for like.
    cpu.reexec_with_cpu_malloc_tunables()
    added = cpu.tune_cpu_xla_flags()
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}" + (" (mmjax's CPU defaults added)" if added else ""))
    print(f"GLIBC_TUNABLES: {os.environ.get('GLIBC_TUNABLES', '')!r} (both sides)")
    import jax

    jax.config.update("jax_platforms", "cpu")

    sides, part_fns = {}, {}
    if args.only in (None, "mmjax"):
        run, config, mmjax_parts = mmjax_step(args.batch, args.override, args.layers)
        sides["mmjax"] = run
        part_fns = {"mmjax": mmjax_parts}
        flops = speed.train_flops_per_example(config, pooled_only=True)
    else:
        from mmjax import config as config_lib

        config = config_lib.load_config_file(os.path.join(ROOT, "configs", "clip_vit_b32.py"))
        if args.layers:
            config = config_lib.apply_overrides(config, [f"config.model.image.depth={args.layers}",
                                                         f"config.model.text.depth={args.layers}"])
        flops = speed.train_flops_per_example(config, pooled_only=True)
    if args.only in (None, "open_clip"):
        sides["open_clip"], part_fns["open_clip"] = open_clip_step(args.model, args.batch, args.threads,
                                                                   args.layers)
    for name, run in sides.items():
        print(f"{name}: warming up ({args.warmup} steps)", flush=True)
        run(args.warmup)
    times = {name: [] for name in sides}
    peaks = []
    for r in range(args.rounds):
        peaks.append(speed.measure_matmul_flops(n=2048, repeats=3))
        print(f"round {r + 1}/{args.rounds}  f32 matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", flush=True)
        for name, run in sides.items():
            run(args.settle)
            seconds = run(args.steps)
            times[name].append(seconds)
            print(f"round {r + 1}/{args.rounds}  {name:9s} {args.batch * args.steps / seconds:6.2f} samples/s",
                  flush=True)
    breakdown = {name: fn() for name, fn in part_fns.items()} if args.breakdown else {}
    # FLOPs each side computes: mmjax's last blocks run the pooled token only, open_clip's every token.
    side_flops = {"mmjax": flops, "open_clip": speed.train_flops_per_example(config, pooled_only=False)}
    result = {"batch": args.batch, "threads": args.threads, "steps": args.steps, "settle": args.settle,
              "flops_per_example": side_flops,
              "matmul_peak_gflops_per_round": [p / 1e9 for p in peaks]}
    for name, ts in times.items():
        sps = args.batch * args.steps / statistics.median(ts)
        fractions = [args.batch * args.steps / t * side_flops[name] / p for t, p in zip(ts, peaks)]
        result[name] = {"samples_per_second": sps, "gflops": sps * side_flops[name] / 1e9,
                        "fraction_of_peak": statistics.median(fractions),
                        "fraction_of_peak_per_round": fractions}
    if len(times) == 2:
        result["ratio_mmjax_over_open_clip"] = (result["mmjax"]["samples_per_second"]
                                                / result["open_clip"]["samples_per_second"])
    print(f"\nf32 matmul peak per round (measured): {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s, "
          f"median {statistics.median(peaks) / 1e9:.0f}; model FLOPs per example: "
          + ", ".join(f"{name} {side_flops[name] / 1e9:.1f} GFLOP" for name in times))
    for name in times:
        r = result[name]
        print(f"{name:9s} {r['samples_per_second']:6.2f} samples/s  {r['gflops']:6.0f} GFLOP/s  "
              f"{100 * r['fraction_of_peak']:4.0f}% of peak (median over rounds of GFLOP/s / that round's peak)")
    if "ratio_mmjax_over_open_clip" in result:
        print(f"mmjax / open_clip: {result['ratio_mmjax_over_open_clip']:.2f}x")
    if breakdown:
        result["breakdown_seconds"] = breakdown
        names = list(breakdown)
        print("\nwhere the time goes (seconds per call, best of 2): " + " | ".join(names))
        for part in next(iter(breakdown.values())):
            cells = "  ".join(f"{breakdown[n][part]:8.3f}" for n in names)
            ratio = (f"  ({breakdown['mmjax'][part] / breakdown['open_clip'][part]:.2f}x)"
                     if len(names) == 2 else "")
            print(f"  {part:24s} {cells}{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
