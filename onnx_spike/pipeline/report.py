"""Readable renderings of validation and evaluation results; the JSON output contains the same data."""

from __future__ import annotations

TARGETS = {
    512: {"perplexity_change": 0.01},
    1024: {"perplexity_change": 0.02},
}
TOP1_TARGET = 0.97
CLOZE_TARGET = 0.005


def _saturation_line(saturation: dict) -> str:
    if not saturation:
        return "saturation: not measured"
    clipped = {name: entry for name, entry in saturation.items() if entry["saturated"]}
    total = sum(entry["total"] for entry in saturation.values())
    if not clipped:
        return f"saturation: none of {total} activations at {len(saturation)} sites"
    lines = [f"saturation: {sum(e['saturated'] for e in clipped.values())} of {total} activations at "
             f"{len(clipped)} of {len(saturation)} sites"]
    for name, entry in sorted(clipped.items(), key=lambda kv: -kv[1]["saturated"])[:10]:
        lines.append(f"  {name}: {entry['saturated']} clipped (max |x| {entry['max_abs']:.4g}, "
                     f"limit {entry['limit']:.4g})")
    return "\n".join(lines)


def render_validation(result: dict) -> str:
    lines = [f"Validation on {result['windows']} windows of {result['window_length']} tokens", "",
             f"{'output':<40} {'max |diff|':>12} {'mean |diff|':>12} {'NaN mismatches':>15}"]
    for name, entry in result["outputs"].items():
        lines.append(f"{name:<40} {entry['max_abs_diff']:>12.4g} {entry['mean_abs_diff']:>12.4g} "
                     f"{entry['nan_mismatch']:>15}")
    lines += ["", f"next-token top-1 agreement: {result['top1_agreement']:.4f}",
              f"KL(original || converted): mean {result['kl_mean']:.3g}, max {result['kl_max']:.3g}",
              f"perplexity on these windows: {result['perplexity_original']:.4f} -> "
              f"{result['perplexity_converted']:.4f}", _saturation_line(result.get("saturation", {}))]
    return "\n".join(lines)


def render_evaluation(results: list[dict], label: str = "") -> str:
    lines = [f"Evaluation{' of ' + label if label else ''}", "",
             f"{'window':>7} {'tokens':>7} {'ppl orig':>9} {'ppl conv':>9} {'change':>8} {'top-1':>7} "
             f"{'KL mean':>9} {'cloze orig':>10} {'cloze conv':>10} {'diff (SE)':>15}"]
    for result in results:
        cloze = result.get("cloze") or {}
        cloze_text = (f"{cloze['accuracy_original']:>10.4f} {cloze['accuracy_converted']:>10.4f} "
                      f"{cloze['difference']:>+8.4f} ({cloze['standard_error']:.4f})" if cloze else f"{'-':>10} {'-':>10} {'-':>15}")
        lines.append(f"{result['window_length']:>7} {result['tokens']:>7} {result['perplexity_original']:>9.4f} "
                     f"{result['perplexity_converted']:>9.4f} {result['perplexity_change']:>+8.3%} "
                     f"{result['top1_agreement']:>7.4f} {result['kl_mean']:>9.2e} {cloze_text}")
    for result in results:
        lines.append(f"{result['window_length']}-token windows, " + _saturation_line(result.get("saturation", {})))
    return "\n".join(lines)


def fidelity_rows(preset: str, results: list[dict]) -> list[dict]:
    """Build one row per window length with its targets and whether each is met."""
    rows = []
    for result in results:
        length = result["window_length"]
        target = TARGETS.get(length, {}).get("perplexity_change")
        cloze = result.get("cloze") or {}
        row = {"preset": preset, "window": length, "perplexity_original": result["perplexity_original"],
               "perplexity_converted": result["perplexity_converted"], "change": result["perplexity_change"],
               "change_target": target, "top1": result["top1_agreement"],
               "cloze_items": cloze.get("items"), "cloze_diff": cloze.get("difference"),
               "cloze_se": cloze.get("standard_error")}
        # Two-sided: a large drop in perplexity means the model changed as much as a rise would.
        met = [target is None or abs(result["perplexity_change"]) <= target, result["top1_agreement"] >= TOP1_TARGET]
        if cloze:
            met.append(abs(cloze["difference"]) <= CLOZE_TARGET)
        row["meets_targets"] = all(met)
        rows.append(row)
    return rows


def render_fidelity(rows: list[dict]) -> str:
    lines = ["Fidelity against the original model (targets: perplexity +1% at 512, +2% at 1024; "
             "top-1 >= 97%; cloze within 0.5 point)", "",
             f"{'preset':<8} {'window':>6} {'ppl orig':>9} {'ppl conv':>9} {'change':>8} {'top-1':>7} "
             f"{'cloze items':>11} {'cloze diff (SE)':>17} {'targets':>8}"]
    for row in rows:
        cloze = (f"{row['cloze_diff']:>+8.4f} ({row['cloze_se']:.4f})" if row["cloze_diff"] is not None
                 else f"{'-':>17}")
        lines.append(f"{row['preset']:<8} {row['window']:>6} {row['perplexity_original']:>9.4f} "
                     f"{row['perplexity_converted']:>9.4f} {row['change']:>+8.3%} {row['top1']:>7.4f} "
                     f"{row['cloze_items'] or '-':>11} {cloze:>17} {'met' if row['meets_targets'] else 'MISSED':>8}")
    return "\n".join(lines)
