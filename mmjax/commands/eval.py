"""`mmjax eval --config C --workdir W [--step N | --all]`: evaluates checkpoints of a training workdir.

For each evaluated step it writes `W/eval/<step>.json` (flat keys: zeroshot/top1, zeroshot/top5,
retrieval/i2t/r1|r5|r10, retrieval/t2i/r1|r5|r10, linear_probe/top1, plus linear_probe/l2, and the task's
reference figures, `Task.reference_evals`: for task 'mdm' linear_probe/random_init/top1|l2), prints a
table, and writes PNGs to `W/eval/`: `curves.png` (loss and eval metrics vs step),
`confusion_<step>.png` (zero-shot), `retrieval_<step>.png` (top-5 images for a few text queries) and, for a
captioning model (task 'coca'), `captions_<step>.png` (its greedy captions of the first 8 test images).
A model with an audio tower also gets zeroshot/audio/top1|top5 on the held-out voices' clips (the same figures
`mmjax train` logs); without an image tower that is its whole evaluation (zeroshot/top1 is then the audio's).

Read-only on the checkpoints (safe while training is still writing them): the model comes from
`mmjax.load(W, step)`, i.e. the workdir's own config.json; `--config` (with `--config.KEY=VALUE`
overrides) supplies the data settings (data.name, data.data_dir, ...) and eval.batch_size.

A model that does not embed images and texts apart (`dual_encoder`: the fusion classifiers of task
'classification', VQ, text-to-image, PaLI, Flamingo) is scored by its task's own evaluation instead, the figures
training logs (classify/accuracy, vq/..., gen/..., vqa/..., fewshot/...), written to the same `W/eval/<step>.json`.

The evaluators and the data they need live in `mmjax.eval.suite`.
"""

from __future__ import annotations

import json

import ml_collections

from mmjax import inference, storage
from mmjax.errors import NotAWorkdirError
from mmjax.eval import plots as plots_lib
from mmjax.eval.suite import evaluate_model, format_table, load_eval_data
from mmjax.tasks import get_task
from mmjax.training.checkpoint import Checkpointer, NoCheckpointError
from mmjax.training.metrics import read_metrics


def _data_config(model_config, cli_config):
    """The workdir's config (model, preprocessing) with the data section of the command-line config."""
    cfg = ml_collections.ConfigDict(model_config.to_dict())
    cfg.data = ml_collections.ConfigDict(cli_config.data.to_dict())
    return cfg


def read_eval_results(workdir: str, log=print) -> dict[int, dict]:
    """{step: metrics} from W/eval/<step>.json. A file that is not a JSON object (damaged) is skipped and reported
    through `log`, naming it."""
    out = {}
    for path in storage.glob(storage.join(workdir, "eval", "*.json")):
        name = storage.name(path)[:-len(".json")]
        if name.isdigit():
            try:
                results = json.loads(storage.read_bytes(path))
            except ValueError as e:  # not JSON, or not UTF-8
                results = f"not JSON ({e})"
            if not isinstance(results, dict):
                log(f"mmjax: skipped {path}: {results if isinstance(results, str) else 'not a JSON object'}; "
                    f"`mmjax eval --step {name}` writes it again")
                continue
            out[int(name)] = results
    return dict(sorted(out.items()))


def _write_json(path: str, obj: dict) -> None:
    """Writes `path` whole or not at all; a failure raises StorageError naming it."""
    with storage.storage_errors("cannot write the evaluation results", path):
        storage.write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _steps(workdir: str, step: int | None, all_steps: bool) -> list[int | None]:
    """The checkpoints to evaluate: every one (`all_steps`), `step`, or [None]: the newest that passes
    verification (`mmjax.load` falls back past damaged ones, saying so)."""
    if not storage.exists(storage.join(workdir, "config.json")):
        raise NotAWorkdirError(f"{workdir!r} is not an mmjax workdir: no config.json in it; pass the --workdir of "
                               f"a training run (or of `mmjax convert`)")
    ckpt_dir = storage.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, async_save=False, read_only=True)
    try:
        steps = sorted(ckpt.all_steps())
        if not steps:
            raise NoCheckpointError(f"no checkpoints in {ckpt_dir}")
        if all_steps:
            return steps
        return [None] if step is None else [ckpt.choose_step(step)]
    finally:
        ckpt.close()


def _write_plots(eval_dir: str, s: int, data: dict, extras: dict) -> None:
    plots_lib.confusion_matrix(data["test"]["label"], extras["zeroshot_preds"], data["class_names"],
                               storage.join(eval_dir, f"confusion_{s}.png"), title=f"zero-shot confusion, step {s}")
    plots_lib.contact_sheet(extras["queries"], data["test"]["image"], extras["top_idx"],
                            storage.join(eval_dir, f"retrieval_{s}.png"), extras["top_correct"])


def dual_encoder(model) -> bool:
    """Whether a `mmjax.load`ed model embeds images and texts apart (`encode_image` / `encode_text`: contrastive,
    CoCa, BEiT-3's dual encoder), so that zero-shot, retrieval and the linear probe apply to it. The others (the
    fusion classifiers, VQ, text-to-image, PaLI, Flamingo) are evaluated by their task's `evaluate`."""
    return bool(getattr(model.encoder.model, "dual_encoder", False))


def run(config, workdir: str, step: int | None = None, all_steps: bool = False, progress: bool = True,
        plots: bool = True, out=print) -> dict[int, dict]:
    """Evaluates the newest verified checkpoint of `workdir` (or `step`, or every one); returns {step: metrics}.
    The workdir may be a local folder or a gs:// URL; results and figures go to `W/eval/`."""
    workdir = storage.absolute(workdir)
    storage.reachable(workdir, "workdir")
    steps = _steps(workdir, step, all_steps)
    eval_dir = storage.join(workdir, "eval")
    storage.makedirs(eval_dir)
    data, reference, results, task_cache = None, None, {}, {}
    for s in steps:
        try:
            model = inference.load(workdir, s)
        except (FileNotFoundError, ValueError) as e:  # deleted by keep-N while we were evaluating
            if len(steps) == 1:
                raise
            out(f"mmjax: skipping checkpoint {s}: {e}")
            continue
        s = model.step
        model.encoder.batch_size = max(1, int(config.eval.batch_size))  # 1 device: no shard rounding
        if progress:
            out(f"mmjax: evaluating checkpoint {s} of {workdir}")
        if not dual_encoder(model):  # the task's own evaluation, as training logs it (classify/..., gen/..., vq/...)
            enc = model.encoder
            results[s] = get_task(model.config).evaluate(model.config, enc.model, enc.params, enc.mesh, enc.rules,
                                                         task_cache)
            _write_json(storage.join(eval_dir, f"{s}.json"), {"step": s, **results[s]})
            continue
        if data is None:
            data = load_eval_data(_data_config(model.config, config))
        metrics, extras = evaluate_model(model, data, progress)
        if reference is None:  # the reference model does not depend on the checkpoint: once per run
            enc = model.encoder
            reference = get_task(model.config).reference_evals(model.config, enc.model, enc.mesh, enc.rules, data,
                                                               enc.batch_size)
        metrics.update(reference)
        results[s] = metrics
        _write_json(storage.join(eval_dir, f"{s}.json"), {"step": s, **metrics})
        if plots and extras["zeroshot_preds"] is not None:  # the image plots
            _write_plots(eval_dir, s, data, extras)
        if plots and get_task(model.config).generates == "captions":  # what it writes about the first test images
            first = data["test"]["image"][:8]
            plots_lib.caption_sheet(first, model.caption(first, preprocessed=True),
                                    storage.join(eval_dir, f"captions_{s}.png"),
                                    [data["class_names"][int(l)] for l in data["test"]["label"][:8]])
    if plots and results:
        plots_lib.training_curves(read_metrics(workdir, log=out), read_eval_results(workdir, log=out),
                                  storage.join(eval_dir, "curves.png"))
    if results:
        out(format_table(results))
        out(f"mmjax: results in {eval_dir}/")
    return results


def main(config, args) -> int:
    run(config, args.workdir, step=args.step, all_steps=args.all, progress=not args.quiet,
        plots=not args.no_plots, out=lambda s: print(s, flush=True))
    return 0
