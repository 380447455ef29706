"""Golden model of the integer leaky-integrate-and-fire neuron and its population count.

State, non-negative integers (`lif_step` on uint64, `population_count` on int64):

- membrane v: the integrated current. Callers keep it below 2^62, and each primitive states
  its bound and the type it uses. It never goes negative because a spike subtracts at most v.
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


def population_count(membrane: np.ndarray, theta: np.ndarray, neurons: int) -> tuple[np.ndarray, np.ndarray]:
    """Count the neurons of a population that fire, by bisection over the ordered thresholds.

    The population has the thresholds theta, 2*theta, .., L*theta on one membrane. Returns
    (count, residual membrane) with count = min(L, floor(v / theta)) and residual
    v - count * theta. The count is built one bit at a time from the most significant one. The
    neuron of threshold theta * 2^k fires when the residual reaches it, and its charge is
    subtracted, so no division and no product of two run-time values is needed. That yields at
    most L - 1, and the top neuron, tested last against theta, adds the last one. Comparing the
    residual is the same as comparing v with the partial sums of the thresholds.
    """
    membrane = np.asarray(membrane, dtype=np.int64)
    theta = np.asarray(theta, dtype=np.int64)
    levels = neurons.bit_length() - 1
    count = np.zeros(np.broadcast(membrane, theta).shape, dtype=np.int64)
    for bit in list(reversed(range(levels))) + [0]:
        threshold = theta << bit
        fires = (membrane >= threshold).astype(np.int64)
        membrane = membrane - fires * threshold
        count = count + (fires << bit)
    return count, membrane
