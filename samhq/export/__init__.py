"""Export to ONNX (`export_onnx`) and run the exported models with onnxruntime (`OnnxPredictor`)."""
from .onnx import export_onnx

__all__ = ["export_onnx", "OnnxPredictor"]


def __getattr__(name):
    # onnxruntime is optional: import the engine only when asked for.
    if name == "OnnxPredictor":
        from .ort import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(name)
