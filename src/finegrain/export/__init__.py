"""Export to ONNX and run exported models with ONNX Runtime."""

from finegrain.export.onnx import OnnxRunner, export_onnx, read_onnx_metadata

__all__ = ["OnnxRunner", "export_onnx", "read_onnx_metadata"]
