"""The names of a run folder's files, in a module that imports nothing: the writers (training, profiling) and the
readers that must not pay for `import torch` (python -m dist_mnist.gpucheck, about 5 s on a GPU machine) share
them."""

CONFIG_FILE = "config.json"  # the resolved config and what the run resolved (world size, device, versions)
SUMMARY_FILE = "summary.json"  # rank 0's end-of-run figures
METRICS_FILE = "metrics.jsonl"  # one record per evaluation (also read by `python -m dist_mnist.report` and the bench)
TRACES_DIR = "traces"  # the profiler's traces, one per rank and window
CHECKPOINTS_DIR = "checkpoints"  # without --checkpoint-dir; a --resume given a run folder looks in it
