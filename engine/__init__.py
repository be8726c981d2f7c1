"""ONNX -> engines: TensorRT and TensorRT-RTX builds through one code path, with metadata sidecars."""
