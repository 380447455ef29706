"""The fixed-point input scale of each site: from a calibrated range, else the static rule.

Static rule (no calibration): the preset's `input_frac_bits` per kind, which gives integer
currents up to 2^(31 - f) for Softmax, SiLU and GELU (32768 at f = 16) and 2^(40 - f) for the
norms (65536 at f = 24): a range that covers the activations of the LLMs this tool was run
on, with resolution 2^-(f+1).

Calibrated rule: with max |x| = r seen on sample inputs, the largest f that keeps 2r inside the
current range (a factor 2 of headroom), clamped to [smallest f the exp table allows, preset
f + 4]. A site whose range needs f below that minimum keeps the minimum and will saturate; the
report says so.
"""

from __future__ import annotations

import dataclasses
import math

from onnx_spike.precision import Precision, PrecisionError

LIMIT_BITS = {"softmax": 31, "silu": 31, "gelu": 31, "rmsnorm": 40, "layernorm": 40}
MAX_FRAC_BITS = {"softmax": 24, "silu": 24, "gelu": 24, "rmsnorm": 32, "layernorm": 32}
HEADROOM = 2.0


def _spec_name(kind: str) -> str:
    return "norm" if kind in ("rmsnorm", "layernorm") else kind


def _valid(precision: Precision, kind: str, frac_bits: int) -> bool:
    spec = dataclasses.replace(getattr(precision, _spec_name(kind)), input_frac_bits=frac_bits)
    try:
        spec.validate()
    except PrecisionError:
        return False
    return True


def calibrated_frac_bits(precision: Precision, kind: str, input_range: float) -> int:
    default = getattr(precision, _spec_name(kind)).input_frac_bits
    upper = min(default + 4, MAX_FRAC_BITS[kind])
    if input_range <= 0 or not math.isfinite(input_range):
        return default
    fitting = math.floor(LIMIT_BITS[kind] - math.log2(HEADROOM * input_range))
    frac_bits = max(min(fitting, upper), 0)
    while frac_bits < upper and not _valid(precision, kind, frac_bits):
        frac_bits += 1
    return frac_bits


def site_precision(precision: Precision, kind: str, site: str,
                   input_ranges: dict[str, float]) -> tuple[Precision, int, float | None]:
    """(precision with this site's input scale, its input_frac_bits, its calibrated range)."""
    spec_name = _spec_name(kind)
    spec = getattr(precision, spec_name)
    input_range = input_ranges.get(site)
    if input_range is None:
        return precision, spec.input_frac_bits, None
    frac_bits = calibrated_frac_bits(precision, kind, input_range)
    updated = dataclasses.replace(precision, **{spec_name: dataclasses.replace(spec, input_frac_bits=frac_bits)})
    return updated, frac_bits, input_range


def saturation_limit(kind: str, frac_bits: int) -> float:
    """Largest |x| a site encodes without clipping."""
    return 2.0 ** (LIMIT_BITS[kind] - frac_bits)
