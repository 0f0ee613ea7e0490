"""ONNX export: the image encoder and the prompt decoder as two ONNX models (run them with
`SamHQPredictor.from_onnx`, or in onnxruntime-web)."""
from .onnx import check_standard_ops, export_onnx

__all__ = ["export_onnx", "check_standard_ops"]
