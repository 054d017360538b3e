"""dist_mnist: DistributedDataParallel MNIST training with profiling and fault tolerance built in."""
