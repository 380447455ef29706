"""Assemble a replaced site: Encode -> integer core -> Decode, as one function of the domain.

The site function takes the float tensor and returns a tensor of the same float type. Its
Encode and Decode children are the only functions with float values; the core works on
integers alone. Decode reproduces what the float op does with NaN and infinities, from the
masks that Encode computed, so special values never pass through the integer state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnx_spike.fixedpoint import build_encode, decode, encode
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function

# Row rules: which masks turn a whole row (last axis) into NaN, and per-element overrides.
NAN = np.float32(np.nan)


def row_any(mask: np.ndarray) -> np.ndarray:
    return mask.any(axis=-1, keepdims=True)


def row_all(mask: np.ndarray) -> np.ndarray:
    return mask.all(axis=-1, keepdims=True)


def golden_site(x: np.ndarray, frac_bits: int, limit: float, out_frac_bits: int,
                core: Callable[[np.ndarray, dict], np.ndarray],
                special: Callable[[np.ndarray, dict], np.ndarray]) -> np.ndarray:
    """Golden model of a site: encode, integer core, decode, special values, original dtype."""
    x = np.asarray(x)
    x32 = x.astype(np.float32)
    masks = {"nan": np.isnan(x32), "pos_inf": np.isposinf(x32), "neg_inf": np.isneginf(x32)}
    currents = encode(x32, frac_bits, limit)
    counts = core(currents, masks)
    y = special(decode(counts, out_frac_bits), masks)
    return y.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


class DecodeBuilder:
    """Helpers for writing the special-value rules of a Decode body."""

    def __init__(self, b: GraphBuilder, masks: dict[str, str]):
        self.b = b
        self.masks = masks

    def row_any(self, mask: str) -> str:
        b = self.b
        flags = b.op("Cast", mask, to=6)
        return b.op("Cast", b.op("ReduceMax", flags, b.const(np.array([-1], np.int64)), keepdims=1), to=9)

    def row_all(self, mask: str) -> str:
        b = self.b
        flags = b.op("Cast", mask, to=6)
        return b.op("Cast", b.op("ReduceMin", flags, b.const(np.array([-1], np.int64)), keepdims=1), to=9)

    def set_where(self, y: str, mask: str, value: float) -> str:
        return self.b.op("Where", mask, self.b.const(np.float32(value)), y)


def build_site(kind: str, params: dict, frac_bits: int, limit: float, out_frac_bits: int,
               core_fn: FunctionSpec, core_inputs: Callable[[dict], list[str]],
               special: Callable[[DecodeBuilder, str], str], doc: str) -> FunctionSpec:
    """The site function `kind(X) -> Y` calling Encode, `core_fn` and a Decode function."""
    encode_fn = build_encode(frac_bits, limit)

    def decode_body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        x, counts, is_nan, is_pos_inf, is_neg_inf = inputs
        y = b.op("Mul", b.op("Cast", counts, to=1), b.const(np.float32(2.0**-out_frac_bits)))
        y = special(DecodeBuilder(b, {"nan": is_nan, "pos_inf": is_pos_inf, "neg_inf": is_neg_inf}), y)
        return [b.op("CastLike", y, x)]

    decode_fn = define_function(f"{kind}Decode", {"out_frac_bits": out_frac_bits, **params},
                                ["X", "Q", "IsNaN", "IsPosInf", "IsNegInf"], 1, decode_body,
                                doc=f"Decode {kind} spike counts to float and apply the float op's special values.")

    def site_body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (x,) = inputs
        currents, is_nan, is_pos_inf, is_neg_inf = b.call(encode_fn, x)
        masks = {"currents": currents, "nan": is_nan, "pos_inf": is_pos_inf, "neg_inf": is_neg_inf}
        (counts,) = b.call(core_fn, *core_inputs(masks))
        (y,) = b.call(decode_fn, x, counts, is_nan, is_pos_inf, is_neg_inf)
        return [y]

    return define_function(f"Spiking{kind}", params, ["X"], 1, site_body,
                           calls=[encode_fn, core_fn, decode_fn], doc=doc)
