"""Golden model of the integer leaky-integrate-and-fire neuron and its population count.

State, all unsigned 64-bit integers:

- membrane v: the integrated current; callers keep it below 2^63 (each primitive states its
  bound); it never goes negative because a spike subtracts at most v.
- threshold theta >= 1: the firing level; a population of L neurons sharing one membrane has
  the ordered thresholds theta, 2*theta, ..., L*theta.
- leak shift k: the leak per step is v >> k (k = 0 disables the leak, giving a plain IF neuron).

One step: `v <- v - (v >> k) + I`, spike when `v >= theta`, soft reset `v <- v - theta` per
spike, so the residue carries to the next step.
"""

from __future__ import annotations

import numpy as np

U64 = np.uint64


def lif_step(membrane: np.ndarray, current: np.ndarray, threshold: np.ndarray,
             leak_shift: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One step of a single LIF neuron; returns (membrane, spike) with spike in {0, 1}."""
    membrane = membrane.astype(U64)
    if leak_shift is not None:
        membrane = membrane - (membrane >> U64(leak_shift))
    membrane = membrane + current.astype(U64)

    spike = membrane >= threshold
    membrane = membrane - np.where(spike, threshold, U64(0)).astype(U64)
    return membrane, spike.astype(U64)


def population_count(membrane: np.ndarray, shifted_thresholds: list[np.ndarray],
                     neurons: int) -> tuple[np.ndarray, np.ndarray]:
    """Count the neurons of a population that fire, by bisection over the ordered thresholds.

    `shifted_thresholds[b]` is `theta << b` for b = 0 .. log2(L). Returns (count, count * theta),
    where count = min(L, floor(v / theta)). Below the top neuron the count is built one bit at
    a time from the most significant bit by comparing v with the partial sum of thresholds, so
    no division and no product of run-time values is needed; that yields at most L - 1, and the
    top neuron, tested on its own, adds the last one.
    """
    levels = neurons.bit_length() - 1
    count = np.zeros_like(membrane, dtype=U64)
    charge = np.zeros_like(membrane, dtype=U64)
    for bit in reversed(range(levels)):
        fires = (membrane >= charge + shifted_thresholds[bit]).astype(U64)
        charge = charge + fires * shifted_thresholds[bit]
        count = (count << U64(1)) + fires

    top = (membrane >= shifted_thresholds[levels]).astype(U64)
    return count + top, charge + top * shifted_thresholds[0]
