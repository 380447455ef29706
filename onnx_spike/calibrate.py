"""Calibration: per-site input ranges of a model measured on sample text.

The original model runs on a few token windows with every site's input exposed as an extra
output; the largest finite |x| per site (ignoring attention-mask values below -1e30 at
Softmax sites) becomes that site's range, from which `passes.calibrate` picks its input scale.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_spike.passes.convert import ConvertOptions, collect_sites
from onnx_spike.pipeline.runtime import SiteProbe, model_file

log = logging.getLogger(__name__)


def measure_ranges(model: str | os.PathLike, windows: np.ndarray, options: ConvertOptions,
                   threads: int | None = None, progress: bool = True) -> dict[str, float]:
    """Site name -> max |x| over `windows` ([n, length] token ids)."""
    path = model_file(model)
    proto = onnx.load(str(path), load_external_data=False)
    inputs = collect_sites(proto, options)
    del proto
    sites = [{"name": name, "input": value, "kind": "", "input_frac_bits": 0} for name, value in inputs.items()]
    probe = SiteProbe(path, sites, threads)
    try:
        ranges: dict[str, float] = {}
        names = sorted({site["input"] for site in probe.sites})
        from onnx_spike.pipeline.runtime import window_feeds

        for tokens in tqdm(windows, desc="calibrate", disable=not progress):
            values = dict(zip(names, probe.session.run(names, window_feeds(probe.session, tokens))))
            for site in probe.sites:
                x = values[site["input"]].astype(np.float64)
                finite = np.isfinite(x) & (x > -1e30)
                if finite.any():
                    ranges[site["name"]] = max(ranges.get(site["name"], 0.0), float(np.abs(x[finite]).max()))
    finally:
        probe.close()
    missing = set(inputs) - set(ranges)
    if missing:
        log.warning("%d sites inside subgraphs or without finite values keep the static scale", len(missing))
    return ranges


def calibration_windows(tokenizer, text_file: str | os.PathLike, length: int, count: int) -> np.ndarray:
    """Token windows of a user's calibration text file."""
    path = Path(text_file)
    if not path.exists():
        raise FileNotFoundError(f"calibration text {path} not found")
    ids = np.asarray(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"], np.int64)
    if len(ids) < length:
        length = len(ids)
    if length < 8:
        raise ValueError(f"calibration text {path} has only {len(ids)} tokens; give at least a few hundred")
    usable = min(count, len(ids) // length)
    return ids[:usable * length].reshape(usable, length)
