"""Shared helpers: onnxruntime sessions over standalone operator models, cached per build."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnx_spike.graph import FunctionSpec
from onnx_spike.library import standalone_model
from onnx_spike.operators import operator_model
from onnx_spike.precision import preset

ELEM_TYPES = {np.dtype(np.uint64): onnx.TensorProto.UINT64, np.dtype(np.int64): onnx.TensorProto.INT64,
              np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16}


def make_session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_function(spec: FunctionSpec, inputs: dict[str, np.ndarray], output_dtypes: list, optimize: bool = True,
                 check: bool = True) -> list[np.ndarray]:
    """Run one FunctionSpec as a standalone model in onnxruntime."""
    value_infos = [helper.make_tensor_value_info(name, ELEM_TYPES[array.dtype], [f"{name}_{i}" for i in range(array.ndim)])
                   for name, array in inputs.items()]
    rank = max(array.ndim for array in inputs.values())
    outputs = [helper.make_tensor_value_info(f"Y{i}", ELEM_TYPES[np.dtype(dtype)], [f"out_{j}" for j in range(rank)])
               for i, dtype in enumerate(output_dtypes)]
    model = standalone_model(spec, value_infos, outputs)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return make_session(model, optimize).run(None, inputs)


@functools.lru_cache(maxsize=None)
def operator_session(kind: str, preset_name: str, dim: int | str = "d", optimize: bool = True,
                     dtype: str = "float32", epsilon: float = 1e-5) -> ort.InferenceSession:
    model = operator_model(kind, preset(preset_name), ["batch", dim], dtype=np.dtype(dtype), epsilon=epsilon)
    return make_session(model, optimize)


def run_operator(kind: str, preset_name: str, x: np.ndarray, optimize: bool = True, epsilon: float = 1e-5) -> np.ndarray:
    dim = x.shape[-1] if kind in ("rmsnorm", "layernorm") else "d"
    session = operator_session(kind, preset_name, dim, optimize, str(x.dtype), epsilon)
    return session.run(None, {"X": x.reshape(-1, x.shape[-1])})[0].reshape(x.shape)


@pytest.fixture(params=[True, False], ids=["ort-optimized", "ort-unoptimized"])
def optimize(request) -> bool:
    return request.param


# ------------------------------------------------------------------ the tiny exported Llama
# Shared by the pipeline and report tests; a test module may define its own fixtures of these
# names to use another model.


@pytest.fixture(scope="session")
def tokenizer():
    from tiny_llama import word_tokenizer

    return word_tokenizer()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tokenizer):
    from tiny_llama import export_tiny_llama

    return export_tiny_llama(tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def converted(exported, tmp_path_factory):
    from onnx_spike import cli

    output = tmp_path_factory.mktemp("spiking") / "converted"
    assert cli.main(["convert", str(exported), str(output)]) == 0
    return output
