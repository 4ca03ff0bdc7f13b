"""`mmjax train --config C --workdir W`: joins the cluster (multi-process runs), then runs the one training loop."""

from __future__ import annotations

from mmjax.runtime import distributed
from mmjax.training.loop import train


def main(config, args) -> int:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    train(config, args.workdir, stop_at_step=args.stop_at_step, verbose=not args.quiet,
          force_unlock=args.force_unlock)
    return 0
