"""posterrt.benchmarks: latency, FLOPs and throughput of models, stages and serving (`posterrt bench`)."""
