"""Engine builders and runners (ONNX Runtime, TensorRT) behind one ``Runner`` interface."""
