"""Runtime: the device mesh and sharding, multi-process start, CPU/XLA settings, FLOP counts and peaks."""
