"""Histograms of the per-element error of each spiking op kind against the exact float op.

Each site's input is captured on real token windows from the original model (`SiteProbe`).
The site function runs alone in onnxruntime, and its output is compared with the exact float
op in float64 (`onnx_spike.reference`): softmax, silu, rms_norm and layer_norm with the
site's epsilon, and tanh- or erf-GELU as the replaced pattern was. One PNG per op kind shows
the histogram of |spiking - exact| on a log-scaled x axis, next to the distribution of the
documented per-element bound (`onnx_spike.operators.error_bound`, against tanh-GELU for
GELU) and the maxima of both as vertical lines. Elements
with a non-finite input or exact value are left out. Exact zeros cannot sit on a log axis,
so the plot states their number instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_spike import reference
from onnx_spike.operators import DEFAULT_EPSILON, error_bound
from onnx_spike.pipeline.energy import SiteRunner
from onnx_spike.pipeline.runtime import SiteProbe, model_file, spiking_sites, window_feeds
from onnx_spike.precision import Precision

# Ten bins per decade from 1e-16 to 1e2. Errors outside that range fall into the first or last bin.
BIN_EDGES = np.logspace(-16, 2, 181)


@dataclass
class KindErrors:
    """Binned errors and bounds of one op kind, over all its sites and windows."""

    error_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(BIN_EDGES) - 1, np.int64))
    bound_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(BIN_EDGES) - 1, np.int64))
    sites: set = field(default_factory=set)
    elements: int = 0
    nonfinite: int = 0  # left out: a non-finite input (a -inf attention mask) or exact value
    zeros: int = 0
    above_bound: int = 0
    error_sum: float = 0.0
    max_error: float = 0.0
    max_bound: float = 0.0

    def add(self, error: np.ndarray, bound: np.ndarray, nonfinite: int) -> None:
        self.nonfinite += nonfinite
        self.elements += error.size
        self.error_sum += float(error.sum())
        self.zeros += int(np.count_nonzero(error == 0))
        self.above_bound += int(np.count_nonzero(error > bound))
        if error.size:
            self.max_error = max(self.max_error, float(error.max()))
            self.max_bound = max(self.max_bound, float(bound.max()))
        low, high = BIN_EDGES[0], BIN_EDGES[-1]
        nonzero = error[error > 0]
        self.error_counts += np.histogram(np.clip(nonzero, low, high), BIN_EDGES)[0]
        self.bound_counts += np.histogram(np.clip(bound[bound > 0], low, high), BIN_EDGES)[0]

    def summary(self) -> dict:
        return {"sites": len(self.sites), "elements": self.elements, "nonfinite_left_out": self.nonfinite,
                "exact_zeros": self.zeros,
                "mean_abs_error": self.error_sum / max(self.elements, 1), "max_abs_error": self.max_error,
                "max_bound": self.max_bound, "above_bound": self.above_bound}


def exact_op(site: dict, x: np.ndarray) -> np.ndarray:
    """Compute the float op a site replaced, in float64, without a norm's weight and bias."""
    kind = site["kind"]
    epsilon = site.get("epsilon") or DEFAULT_EPSILON
    if kind == "softmax":
        return reference.softmax(x)
    if kind == "silu":
        return reference.silu(x)
    if kind == "rmsnorm":
        return reference.rms_norm(x, epsilon)
    if kind == "layernorm":
        return reference.layer_norm(x, epsilon)
    if kind == "gelu":
        # NOTE: a fused ONNX Gelu with approximate="tanh" is compared with erf-GELU, because the
        # site record keeps the rule name ("FusedGelu") but not the attribute.
        tanh_form = "Tanh" in site.get("rule", "") or "FastGelu" in site.get("rule", "")
        return reference.gelu_tanh(x) if tanh_form else reference.gelu_erf(x)
    raise ValueError(f"unknown site kind {kind!r}")


def site_precision(precision: Precision, site: dict) -> Precision:
    """Return the model's precision with this site's input scale (calibration may change it per site)."""
    name = "norm" if site["kind"] in ("rmsnorm", "layernorm") else site["kind"]
    spec = dataclasses.replace(getattr(precision, name), input_frac_bits=site["input_frac_bits"])
    return dataclasses.replace(precision, **{name: spec})


def model_precision(converted: str | os.PathLike) -> Precision:
    proto = onnx.load(str(model_file(converted)), load_external_data=False)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    if "onnx_spike" not in metadata:
        raise ValueError(f"{converted} has no onnx_spike metadata; it is not a converted model")
    return Precision.from_dict(json.loads(metadata["onnx_spike"])["precision"])


def site_errors(runner: SiteRunner, precision: Precision, site: dict,
                x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Return |spiking - exact| and the error bound at the elements with a finite input and exact
    value, and the number of elements left out."""
    spiking = runner.run_onnxruntime(site["function"], x).astype(np.float64)
    exact = exact_op(site, x)
    bound = error_bound(site["kind"], x, site_precision(precision, site), site.get("epsilon") or DEFAULT_EPSILON)
    finite = np.isfinite(x) & np.isfinite(exact)
    return np.abs(spiking - exact)[finite], np.broadcast_to(bound, x.shape)[finite], int(finite.size - finite.sum())


def _elements(count: int) -> str:
    return f"{count:,} element{'' if count == 1 else 's'}"


def plot_kind(kind: str, errors: KindErrors, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.stairs(errors.error_counts, BIN_EDGES, label="|spiking - exact|", color="tab:blue", linewidth=1.5)
    bound_label = "error bound per element" + (" (against tanh-GELU)" if kind == "gelu" else "")
    axes.stairs(errors.bound_counts, BIN_EDGES, label=bound_label, color="tab:orange", linestyle="--")
    axes.axvline(errors.max_bound, color="tab:red", linestyle=":", label=f"max bound {errors.max_bound:.3g}")
    axes.axvline(errors.max_error, color="tab:blue", linestyle=":", label=f"max error {errors.max_error:.3g}")
    axes.set_xscale("log")
    used = np.flatnonzero(errors.error_counts + errors.bound_counts)
    if used.size:
        axes.set_xlim(BIN_EDGES[max(used[0] - 10, 0)], BIN_EDGES[min(used[-1] + 11, len(BIN_EDGES) - 1)])
    axes.set_yscale("log")
    axes.set_xlabel("absolute error")
    axes.set_ylabel("elements per bin (10 bins per decade)")
    axes.set_title(f"{kind}: {errors.elements:,} elements at {len(errors.sites)} sites, {caption}", fontsize=10)
    notes = [f"{_elements(errors.zeros)} with error 0 not shown"] if errors.zeros else []
    if errors.error_counts[0]:
        notes.append(f"the first bin also counts errors below {BIN_EDGES[0]:.0e}")
    if errors.nonfinite:
        notes.append(f"{_elements(errors.nonfinite)} with a non-finite input (masked) left out")
    if errors.above_bound:
        notes.append(f"{_elements(errors.above_bound)} above their bound")
    if notes:
        axes.text(0.01, 0.98, "\n".join(notes), transform=axes.transAxes, va="top", fontsize=8)
    axes.legend(fontsize=8, loc="best")
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def error_histograms(original: str | os.PathLike, converted: str | os.PathLike, windows: np.ndarray,
                     output_dir: str | os.PathLike, threads: int | None = None, progress: bool = True) -> dict:
    """Write `<kind>.png` per op kind to `output_dir`, and return the error summary and file per kind."""
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim == 1:
        windows = windows[None]
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    precision = model_precision(converted)
    sites = spiking_sites(converted)
    runner = SiteRunner(converted, threads)
    by_kind: dict[str, KindErrors] = {}

    probe = SiteProbe(original, sites, threads)
    try:
        names = sorted({site["input"] for site in probe.sites})
        for tokens in tqdm(windows, desc="error histograms", disable=not progress):
            values = dict(zip(names, probe.session.run(names, window_feeds(probe.session, tokens))))
            for site in probe.sites:
                error, bound, nonfinite = site_errors(runner, precision, site, values[site["input"]])
                entry = by_kind.setdefault(site["kind"], KindErrors())
                entry.sites.add(site["name"])
                entry.add(error, bound, nonfinite)
    finally:
        probe.close()

    caption = f"{len(windows)} window{'s' if len(windows) != 1 else ''} of {windows.shape[1]} tokens"
    results = {}
    for kind, entry in by_kind.items():
        path = output / f"{kind}.png"
        plot_kind(kind, entry, path, caption)
        results[kind] = {**entry.summary(), "file": str(path)}
    return results


def render_histograms(results: dict) -> str:
    lines = [f"{'kind':<10} {'sites':>5} {'elements':>10} {'mean |err|':>11} {'max |err|':>10} {'max bound':>10} "
             f"{'above bound':>11}  file"]
    for kind, entry in results.items():
        lines.append(f"{kind:<10} {entry['sites']:>5} {entry['elements']:>10} {entry['mean_abs_error']:>11.3g} "
                     f"{entry['max_abs_error']:>10.3g} {entry['max_bound']:>10.3g} {entry['above_bound']:>11}  "
                     f"{entry['file']}")
    return "\n".join(lines)
