"""The float boundary of a spiking site: encode to integer currents, decode spike counts.

Encode: `x * 2^f`, round half to even, clip to +-limit, NaN to 0, cast to int64. The limit is
a float32 value that the cast represents exactly: onnxruntime casts any out-of-range float,
+-inf and NaN to INT_MIN, so saturation must happen before the cast. `INT32_LIMIT` (the
largest float32 not above 2^31 - 1) bounds the int32 currents of Softmax, SiLU and GELU, and
`INT40_LIMIT` the int64 currents of the norms.

Decode: `count * 2^-n` in float32, exact while |count| < 2^24.

These NumPy functions are the golden model of the Encode and Decode functions that
`operators/site.py` builds.
"""

from __future__ import annotations

import numpy as np

INT32_LIMIT = 2147483520.0  # largest float32 <= 2^31 - 1
INT40_LIMIT = float(1 << 40)


def encode(x: np.ndarray, frac_bits: int, limit: float) -> np.ndarray:
    """Encode float activations to int64 currents with `frac_bits` fractional bits, saturating."""
    x32 = np.asarray(x).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = x32 * np.float32(2.0**frac_bits)
    rounded = np.round(scaled)
    clipped = np.clip(rounded, np.float32(-limit), np.float32(limit))
    clipped = np.where(np.isnan(x32), np.float32(0), clipped)
    return clipped.astype(np.int64)


def decode(counts: np.ndarray, frac_bits: int) -> np.ndarray:
    """Decode integer spike counts with `frac_bits` fractional bits to float32."""
    return counts.astype(np.float32) * np.float32(2.0**-frac_bits)
