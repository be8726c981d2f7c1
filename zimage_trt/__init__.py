"""zimage-trt: Z-Image-Turbo on TensorRT.

    zimage_trt.export    PyTorch -> ONNX bundle (needs diffusers)     export/
    zimage_trt.engine    ONNX -> TensorRT / TensorRT-RTX engines      engine/
    zimage_trt.runtime   the lean generation loop and its backends    runtime/
    zimage_trt.cli       the `zimage-trt` command
"""

__version__ = "0.1.0"
