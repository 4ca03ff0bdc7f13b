"""`mmjax train --config C --workdir W`: joins the cluster (multi-process runs), lets the task prepare what it needs
first (`Task.prepare`: e.g. the image tokenizer of text-to-image, trained in W/tokenizer), then runs the one
training loop."""

from __future__ import annotations

from mmjax import tasks
from mmjax.runtime import distributed
from mmjax.training.loop import train


def main(config, args) -> int:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    def train_fn(c, workdir):
        return train(c, workdir, verbose=not args.quiet, force_unlock=args.force_unlock)

    config = tasks.get_task(config).prepare(config, args.workdir, train_fn, log=print)
    train(config, args.workdir, stop_at_step=args.stop_at_step, verbose=not args.quiet,
          force_unlock=args.force_unlock)
    return 0
