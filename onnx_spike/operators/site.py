"""Assemble a replaced site: Encode -> integer core -> Decode, as one function of the domain.

The site function takes the float tensor and returns a tensor of the same float type. Its
Encode and Decode children are the only functions with float values; the core works on
integers alone. Decode reproduces what the float op does with NaN and infinities, from the
input and the masks that Encode computed, so special values never pass through the integer
state.

Encode: `x * 2^f`, round half to even, clip to +-limit in float, cast to the current type
(int32 for the kinds whose limit is `INT32_LIMIT`, int64 otherwise), and clip again in
integers. The float clip keeps +-inf and large values from the cast, which onnxruntime turns
into INT_MIN, and the integer clip maps whatever the cast gives for NaN (INT_MIN on x86) to a
current in range. Every kind's Decode overwrites the outputs that a NaN reaches, so that
current never shows, and no Where (an order of magnitude slower than the arithmetic ops in
onnxruntime) is needed. Encode computes only the masks that a kind's core and Decode read.

Decode: `count * 2^-n` in float32, exact while |count| < 2^24, then the special values by
float arithmetic: `x * 0` is NaN exactly where x is NaN or infinite and +-0 elsewhere, and
per-row values come from per-row Where nodes, which are cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnx_spike.fixedpoint import decode, encode
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function

# Row rules: which masks turn a whole row (last axis) into NaN, and per-element overrides.
NAN = np.float32(np.nan)
MASKS = ("nan", "pos_inf", "neg_inf")
_AXES = np.array([-1], np.int64)


def row_any(mask: np.ndarray) -> np.ndarray:
    return mask.any(axis=-1, keepdims=True)


def row_all(mask: np.ndarray) -> np.ndarray:
    return mask.all(axis=-1, keepdims=True)


def encode_currents(x32: np.ndarray, frac_bits: int, limit: float) -> np.ndarray:
    """Golden Encode: int64 currents, NaN saturated to -limit as onnxruntime's cast does on x86."""
    return np.where(np.isnan(x32), np.int64(-int(limit)), encode(x32, frac_bits, limit))


def golden_site(x: np.ndarray, frac_bits: int, limit: float, out_frac_bits: int,
                core: Callable[[np.ndarray, dict], np.ndarray],
                special: Callable[[np.ndarray, dict], np.ndarray]) -> np.ndarray:
    """Golden model of a site: encode, integer core, decode, special values, original dtype."""
    x = np.asarray(x)
    x32 = x.astype(np.float32)
    masks = {"nan": np.isnan(x32), "pos_inf": np.isposinf(x32), "neg_inf": np.isneginf(x32)}
    currents = encode_currents(x32, frac_bits, limit)
    counts = core(currents, masks)
    y = special(decode(counts, out_frac_bits), masks)
    return y.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


def build_encode(frac_bits: int, limit: float, dtype: str, masks: Sequence[str]) -> FunctionSpec:
    """Encode to `dtype` currents, plus the requested masks (bool, shaped like X)."""
    int_type = {"int32": 6, "int64": 7}[dtype]
    int_limit = np.array(int(limit), dtype=np.int32 if dtype == "int32" else np.int64)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (x,) = inputs
        x32 = b.op("Cast", x, to=1)
        scaled = b.op("Mul", x32, b.const(np.float32(2.0**frac_bits)))
        clipped = b.op("Clip", b.op("Round", scaled), b.const(np.float32(-limit)), b.const(np.float32(limit)))
        currents = b.op("Clip", b.op("Cast", clipped, to=int_type), b.const(-int_limit), b.const(int_limit))
        outputs = [currents]
        for name in masks:
            if name == "nan":
                outputs.append(b.op("IsNaN", x32))
            elif name == "pos_inf":
                outputs.append(b.op("IsInf", x32, detect_negative=0))
            else:
                outputs.append(b.op("IsInf", x32, detect_positive=0))
        return outputs

    params = {"frac_bits": frac_bits, "limit": limit, "dtype": dtype, "masks": list(masks)}
    return define_function("Encode", params, ["X"], 1 + len(masks), body,
                           doc="Encode float activations to integer currents, saturating before the cast.")


class DecodeBuilder:
    """Helpers for writing the special-value rules of a Decode body.

    `x` is the site input cast to float32, and `masks` maps mask names to the Encode outputs.
    """

    def __init__(self, b: GraphBuilder, x: str, masks: dict[str, str]):
        self.b = b
        self.x = x
        self.masks = masks

    def row_any(self, mask: str) -> str:
        b = self.b
        flags = b.op("Cast", mask, to=6)
        return b.op("Cast", b.op("ReduceMax", flags, b.const(_AXES), keepdims=1), to=9)

    def row_max(self) -> str:
        """Float max of x over the last axis."""
        return self.b.op("ReduceMax", self.x, self.b.const(_AXES), keepdims=1)

    def zero_or_nan(self) -> str:
        """x * 0: NaN where x is NaN or infinite, +-0 elsewhere."""
        return self.b.op("Mul", self.x, self.b.const(np.float32(0.0)))

    def row_sum(self, value: str) -> str:
        return self.b.op("ReduceSum", value, self.b.const(_AXES), keepdims=1)

    def pick(self, flag: str, if_true: float | str, if_false: float | str) -> str:
        """Select between two float values with Where on a small per-row flag."""
        b = self.b
        as_name = lambda v: b.const(np.float32(v)) if isinstance(v, float) else v
        return b.op("Where", flag, as_name(if_true), as_name(if_false))


def build_site(kind: str, params: dict, frac_bits: int, limit: float, out_frac_bits: int,
               core_fn: FunctionSpec, core_masks: Sequence[str], decode_masks: Sequence[str],
               special: Callable[[DecodeBuilder, str], str], doc: str, dtype: str = "int64") -> FunctionSpec:
    """The site function `kind(X) -> Y` calling Encode, `core_fn` and a Decode function.

    The core receives the currents and then `core_masks`; Decode receives X, the counts and
    then `decode_masks`. Encode computes only the masks that one of them reads.
    """
    masks = [name for name in MASKS if name in core_masks or name in decode_masks]
    encode_fn = build_encode(frac_bits, limit, dtype, masks)

    def decode_body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        x, counts, *mask_values = inputs
        y = b.op("Mul", b.op("Cast", counts, to=1), b.const(np.float32(2.0**-out_frac_bits)))
        x32 = b.op("Cast", x, to=1)
        y = special(DecodeBuilder(b, x32, dict(zip(decode_masks, mask_values))), y)
        return [b.op("CastLike", y, x)]

    decode_inputs = ["X", "Q"] + [f"Is_{name}" for name in decode_masks]
    decode_fn = define_function(f"{kind}Decode", {"out_frac_bits": out_frac_bits, **params},
                                decode_inputs, 1, decode_body,
                                doc=f"Decode {kind} spike counts to float and apply the float op's special values.")

    def site_body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (x,) = inputs
        currents, *mask_values = b.call(encode_fn, x)
        by_name = dict(zip(masks, mask_values))
        (counts,) = b.call(core_fn, currents, *(by_name[name] for name in core_masks))
        (y,) = b.call(decode_fn, x, counts, *(by_name[name] for name in decode_masks))
        return [y]

    return define_function(f"Spiking{kind}", params, ["X"], 1, site_body,
                           calls=[encode_fn, core_fn, decode_fn], doc=doc)
