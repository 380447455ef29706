"""Float reference of the paper's operator semantics, and the exact float ops, in NumPy float64.

The float reference follows the public float model of Yuan et al. (NLSpike, MIT): PWL exp on
[-H, H] with K chords in `a*x + b` form (0 below -H, e^H above H), the division done in float,
and the result floored to the 2^-q grid; SiLU is 0 below -H; RMSNorm takes a CORDIC l2 norm
over the sorted magnitudes plus sqrt(eps * d), with the odd element carried unscaled and the
gain divided out per merge. Comparing the integer `paper` preset with it separates the error
of the method from the error of this implementation.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (1.0 + np.exp(-x))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rms_norm(x: np.ndarray, epsilon: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + epsilon)


def layer_norm(x: np.ndarray, epsilon: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + epsilon)


# ---------------------------------------------------------------- the paper's float semantics


def floor_to_grid(x: np.ndarray, frac_bits: int) -> np.ndarray:
    return np.floor(x * 2.0**frac_bits) / 2.0**frac_bits


def paper_pwl_exp(x: np.ndarray, half_range: float = 5.0, segments: int = 64) -> np.ndarray:
    knots = np.linspace(-half_range, half_range, segments + 1)
    values = np.exp(knots)
    width = 2.0 * half_range / segments
    slopes = (values[1:] - values[:-1]) / width
    intercepts = values[:-1] - slopes * knots[:-1]
    index = np.searchsorted(knots[1:-1], x, side="left")
    approx = slopes[index] * x + intercepts[index]
    return np.where(x < -half_range, 0.0, np.where(x > half_range, math.exp(half_range), approx))


def paper_softmax(x: np.ndarray, half_range: float = 5.0, segments: int = 64, frac_bits: int = 8) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True) + half_range
    numerators = paper_pwl_exp(shifted, half_range, segments)
    return floor_to_grid(numerators / numerators.sum(axis=-1, keepdims=True), frac_bits)


def paper_silu(x: np.ndarray, half_range: float = 5.0, segments: int = 64, frac_bits: int = 8) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    y = x / (1.0 + paper_pwl_exp(-x, half_range, segments))
    return floor_to_grid(np.where(x < -half_range, 0.0, y), frac_bits)


def _cordic_pair(x: np.ndarray, y: np.ndarray, iterations: int) -> np.ndarray:
    gain = math.prod(math.sqrt(1.0 + 2.0 ** (-2 * k)) for k in range(iterations))
    for k in range(iterations):
        direction = np.where(y >= 0, 1.0, -1.0)
        x, y = x + direction * y / 2**k, y - direction * x / 2**k
    return np.abs(x) / gain


def paper_cordic_l2(x: np.ndarray, eps_sum: float, iterations: int = 8) -> np.ndarray:
    values = np.abs(np.asarray(x, dtype=np.float64))
    if eps_sum > 0:
        values = np.concatenate([values, np.full(values.shape[:-1] + (1,), math.sqrt(eps_sum))], axis=-1)
    values = np.sort(values, axis=-1)
    while values.shape[-1] > 1:
        count = values.shape[-1]
        half = count // 2
        merged = _cordic_pair(values[..., 0:2 * half:2], values[..., 1:2 * half:2], iterations)
        values = np.concatenate([merged, values[..., -1:]], axis=-1) if count % 2 else merged
    return values[..., 0]


def paper_rms_norm(x: np.ndarray, epsilon: float = 1e-5, iterations: int = 8, frac_bits: int = 8) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[-1]
    norm = paper_cordic_l2(x, epsilon * dim, iterations)
    return floor_to_grid(x * (math.sqrt(dim) / norm)[..., None], frac_bits)
