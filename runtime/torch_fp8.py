"""FP8 linear layers for the torch backend: the calibrated per-tensor E4M3 scales of an fp8 bundle, run on FP8
tensor cores through `torch._scaled_mm`.

The arithmetic is ModelOpt's FP8 fake quantization (`tensor_quant._fp8_eager`) split where the hardware splits
it: `q = e4m3(clamp(x * 448 / amax, -448, 448))` for the input (at run time, with the calibrated amax) and for the
weight (once, at load); the product of the two FP8 tensors accumulates in float32 and is rescaled by
`amax_x / 448 * amax_w / 448`, which is the dequantization ModelOpt applies to each side before its matmul.

`_scaled_mm` on CUDA needs the inner and outer sizes in multiples of 16; a layer that is not (none in Z-Image-Turbo:
3840 and 10240; the tiny test model's SwiGLU, 682) computes the same quantized values with a dequantized matmul.
This module is pure torch: the app finds the layers and their scales and swaps these in.
"""

from __future__ import annotations

import torch
from torch import nn

from zimage_trt.common.errors import UserError

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89), Hopper (sm90), Blackwell


def require_fp8_tensor_cores(device: torch.device) -> None:
    """One line for a GPU without FP8 tensor cores (before sm89)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise UserError(f"{torch.cuda.get_device_name(device)} (sm{major}{minor}) has no FP8 tensor cores (sm89 and "
                        "newer: RTX 40xx, L40S, H100, RTX 50xx): run this fp8 bundle with --backend onnxruntime, or "
                        "an fp16 bundle with --backend torch")


def reciprocal_scale(amax: torch.Tensor) -> torch.Tensor:
    """448 / amax in float32, as ModelOpt computes it (an amax of zero quantizes with scale 1)."""
    amax = amax.detach().float().reshape(())
    return E4M3_MAX / torch.where(amax <= 2.0**-24, torch.ones_like(amax), amax)


def quantize(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x in FP8 E4M3 under a per-tensor scale: saturated, rounded to nearest even."""
    return (x.float() * inv_scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


class Fp8Linear(nn.Module):
    """A Linear whose input and weight are quantized to FP8 with calibrated per-tensor scales."""

    def __init__(self, linear: nn.Linear, input_amax: torch.Tensor, weight_amax: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        """device: where the FP8 layer lives (default: the Linear's); the high-precision weight need not be there,
        so a model can be quantized layer by layer onto a GPU that could not hold it unquantized."""
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        device = torch.device(device) if device is not None else linear.weight.device
        x_inv, w_inv = reciprocal_scale(input_amax).to(device), reciprocal_scale(weight_amax).to(device)
        # Buffers, not parameters: a LoRA cannot reach a calibrated weight (fp8 bundles bake LoRAs at export).
        self.register_buffer("weight", quantize(linear.weight.detach().to(device), w_inv))  # [out, in], once
        self.register_buffer("input_inv_scale", x_inv)
        self.register_buffer("input_scale", 1 / x_inv)  # what dequantizes, as ModelOpt's scale_inv
        self.register_buffer("weight_scale", 1 / w_inv)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        # CUDA's FP8 GEMM wants both matmul sizes in multiples of 16; the CPU's emulation takes any
        self.aligned = self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.native: bool | None = None  # None: _scaled_mm where it takes the sizes; True/False force a path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # row-major rows: the layout _scaled_mm takes for its first operand (a no-op for what the blocks pass)
        q = quantize(x.reshape(-1, self.in_features).contiguous(), self.input_inv_scale)
        if self._on_scaled_mm(x):
            # weight.t() is column-major, the layout _scaled_mm takes for its second operand
            y = torch._scaled_mm(q, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=self.dtype)
        else:
            x_deq = (q.float() * self.input_scale).to(self.dtype)
            w_deq = (self.weight.float() * self.weight_scale).to(self.dtype)
            y = nn.functional.linear(x_deq, w_deq, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def _on_scaled_mm(self, x: torch.Tensor) -> bool:
        return self.native if self.native is not None else (self.aligned or not x.is_cuda)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, e4m3, {'scaled_mm' if self.aligned else 'dequantized'}"


def swap_fp8_linears(module: nn.Module, amax: dict[str, tuple[float, float]],
                     dtype: torch.dtype = torch.bfloat16, device=None) -> int:
    """Replace each Linear named in `amax` ({module path: (input amax, weight amax)}) by its Fp8Linear (on
    `device`), in place; returns how many. A name that is not a Linear of `module` is a bundle of another model:
    one line."""
    modules = dict(module.named_modules())
    for name, (input_amax, weight_amax) in amax.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise UserError(f"the fp8 graph quantizes {name!r}, which is not a Linear of this model: the bundle was "
                            "exported from another model (pass the --model it was exported from)")
        parent_name, _, child = name.rpartition(".")
        fp8 = Fp8Linear(linear, torch.tensor(input_amax), torch.tensor(weight_amax), dtype, device)
        setattr(modules[parent_name] if parent_name else module, child, fp8)
    return len(amax)


def fp8_layers(module: nn.Module) -> list[Fp8Linear]:
    return [m for m in module.modules() if isinstance(m, Fp8Linear)]
