"""The worker: executor, model runner over a persistent input batch, sampler, CUDA graphs, memory planning."""
