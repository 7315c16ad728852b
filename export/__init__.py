"""stunet.export: ONNX export with custom-op nodes (standard-op fallbacks) and TensorRT engine build/run."""
