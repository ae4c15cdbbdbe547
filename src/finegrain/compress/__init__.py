"""Model compression: structured pruning (quantization lives with export, in ONNX Runtime)."""
