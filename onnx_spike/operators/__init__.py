"""The spiking operators: one entry point per kind for building, running and bounding them.

`build_site_function` returns the ONNX function of a replaced site, `golden` its NumPy twin,
`error_bound` the documented per-element bound against the exact op, and `operator_model` a
standalone ONNX model of one operator for inspection and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnx_spike import bounds
from onnx_spike.graph import FunctionSpec, execution_form
from onnx_spike.library import MIN_OPSET, standalone_model
from onnx_spike.operators import norm, silu, softmax
from onnx_spike.precision import Precision

KINDS = ("softmax", "silu", "gelu", "rmsnorm", "layernorm")
DEFAULT_EPSILON = 1e-5


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown operator kind {kind!r}; choose one of {', '.join(KINDS)}")


def norm_plan(kind: str, precision: Precision, dim: int, epsilon: float) -> norm.NormPlan:
    return norm.NormPlan(precision.norm, dim, epsilon, center=(kind == "layernorm"))


def build_site_function(kind: str, precision: Precision, dim: int | None = None,
                        epsilon: float = DEFAULT_EPSILON) -> FunctionSpec:
    """The site function of one operator kind; norms need the normalized size `dim`."""
    _check_kind(kind)
    if kind == "softmax":
        return softmax.build_spiking_softmax(precision.softmax)
    if kind == "silu":
        return silu.build_spiking_silu(precision.silu)
    if kind == "gelu":
        return silu.build_spiking_gelu(precision.gelu)
    if dim is None:
        raise ValueError(f"{kind}: the normalized dimension (last axis size) is required")
    return norm.build_spiking_norm(norm_plan(kind, precision, dim, epsilon))


def golden(kind: str, x: np.ndarray, precision: Precision, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    """NumPy golden model of the site function, bit for bit."""
    _check_kind(kind)
    if kind == "softmax":
        return softmax.spiking_softmax(x, precision.softmax)
    if kind == "silu":
        return silu.spiking_silu(x, precision.silu)
    if kind == "gelu":
        return silu.spiking_gelu(x, precision.gelu)
    return norm.spiking_norm(x, norm_plan(kind, precision, np.shape(x)[-1], epsilon))


def error_bound(kind: str, x: np.ndarray, precision: Precision, epsilon: float = DEFAULT_EPSILON) -> np.ndarray:
    """Per-element bound on |spiking - exact| for finite `x` (GELU: against tanh-GELU)."""
    _check_kind(kind)
    if kind == "softmax":
        return bounds.softmax_bound(x, precision.softmax)
    if kind == "silu":
        return bounds.silu_bound(x, precision.silu)
    if kind == "gelu":
        x64 = np.asarray(x, dtype=np.float64)
        argument = silu.GELU_SLOPE * (x64 + silu.GELU_CUBIC * x64**3)
        # GELU's derivative is below 1.13 everywhere.
        return bounds.silu_bound(x, precision.gelu, derivative_bound=1.13, argument=argument)
    return bounds.norm_bound(x, norm_plan(kind, precision, np.shape(x)[-1], epsilon))


_ONNX_FLOAT_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
                     np.dtype(np.float64): onnx.TensorProto.DOUBLE}


def operator_model(kind: str, precision: Precision, shape: Sequence[int | str], dtype=np.float32,
                   opset: int = MIN_OPSET, epsilon: float = DEFAULT_EPSILON, form: str = "loop") -> onnx.ModelProto:
    """A standalone model `Y = spiking_op(X)` for one operator, X and Y of `shape` and `dtype`.

    The last axis of `shape` must be a number for the norms. Passes
    `onnx.checker.check_model(full_check=True)` and strict shape inference.
    """
    dim = shape[-1] if isinstance(shape[-1], int) else None
    with execution_form(form):
        function = build_site_function(kind, precision, dim=dim, epsilon=epsilon)
    elem_type = _ONNX_FLOAT_TYPES.get(np.dtype(dtype))
    if elem_type is None:
        raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or float64")
    x = helper.make_tensor_value_info("X", elem_type, list(shape))
    y = helper.make_tensor_value_info("Y", elem_type, list(shape))
    return standalone_model(function, [x], [y], opset=opset)
