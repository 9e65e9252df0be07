"""posterrt.export: PyTorch reference networks, checkpoint loading, ONNX export with parity checks."""
