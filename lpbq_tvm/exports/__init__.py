"""Exports that other toolchains read: AIMET encodings JSON, QDQ ONNX for Qualcomm's QNN runtime,
blocked-INT4 ONNX for onnxruntime CPU. One module per format; each writer has a reader or a
validation that loads the result back."""
