"""posterrt.engines: TensorRT engines, ONNX clean-up for TensorRT / ONNX Runtime, engine manifests."""
