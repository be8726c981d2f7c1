"""PyTorch -> ONNX: the model checkpoint, the export wrappers, the FP16 rescale, and the bundle writer."""
