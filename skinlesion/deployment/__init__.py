"""The deployment phase: the model as an ONNX file (stage export) and its runner on ONNX Runtime."""
