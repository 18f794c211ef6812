"""Bad models and bad inputs raise ModelError naming the problem; never a crash, hang or half-built Model."""
from __future__ import annotations

import types

import numpy as np
import pytest

from conftest import fixture_data, fixture_path
from edge_qmul import ModelError, Op, QuantParams, Tensor, load_tflite
from edge_qmul import litert
from edge_qmul.tflite import to_bytes


def _raw_model(tensors, ops, inputs, outputs):
    """A model object the writer accepts but that skips Model's checks (to write bad files)."""
    for i, op in enumerate(ops):
        op.index = i
    return types.SimpleNamespace(tensors=tensors, ops=ops, inputs=inputs, outputs=outputs,
                                 metadata={}, signature=None, description="test")


def _float_conv_bytes() -> bytes:
    rng = np.random.default_rng(0)
    f32 = np.dtype(np.float32)
    tensors = [Tensor("x", (1, 6, 6, 2), f32),
               Tensor("w", (3, 3, 3, 2), f32, data=rng.normal(size=(3, 3, 3, 2)).astype(np.float32)),
               Tensor("b", (3,), f32, data=np.zeros(3, np.float32)),
               Tensor("y", (1, 6, 6, 3), f32)]
    ops = [Op("CONV_2D", [0, 1, 2], [3], {"padding": "SAME", "stride_h": 1, "stride_w": 1,
                                          "activation": "NONE"}, version=1)]
    return to_bytes(_raw_model(tensors, ops, [0], [3]))


def _int8_op_bytes(kind: str, options=None) -> bytes:
    q = QuantParams([0.05], [3])
    i8 = np.dtype(np.int8)
    tensors = [Tensor("x", (1, 4), i8, q), Tensor("y", (1, 4), i8, q)]
    return to_bytes(_raw_model(tensors, [Op(kind, [0], [1], options or {}, version=1)], [0], [1]))


def test_truncated_files():
    data = fixture_path("digits_cnn").read_bytes()
    for cut in [0, 3, 7, 8, 16, 100, len(data) // 2, len(data) - 1]:
        with pytest.raises(ModelError) as e:
            load_tflite(data[:cut])
        assert str(e.value)


def test_not_a_flatbuffer():
    with pytest.raises(ModelError, match="file identifier"):
        load_tflite(b"this is plainly not a flatbuffer at all" * 10)


def test_wrong_file_identifier():
    data = bytearray(fixture_path("mlp40").read_bytes())
    data[4:8] = b"XYZ9"
    with pytest.raises(ModelError, match=r"file identifier is b'XYZ9'"):
        load_tflite(bytes(data))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelError, match="nope.tflite"):
        load_tflite(tmp_path / "nope.tflite")


def test_float_model_is_refused():
    data = _float_conv_bytes()
    litert.interpreter(data)  # a valid model LiteRT runs...
    with pytest.raises(ModelError, match=r"CONV_2D \(index 0\).*float32.*not int8-quantized"):
        load_tflite(data)  # ...but not an int8 one


@pytest.mark.parametrize("kind", ["SQUARED_DIFFERENCE", "GATHER", "ARG_MAX"])
def test_unsupported_op_names_op_and_index(kind):
    with pytest.raises(ModelError, match=rf"unsupported ops: {kind} x1 \(at index 0\)"):
        load_tflite(_int8_op_bytes(kind))


def test_every_unsupported_op_is_listed_with_its_count():
    """A user learns the whole distance at once, not one op per attempt."""
    q = QuantParams([0.05], [3])
    i8 = np.dtype(np.int8)
    kinds = ["EXP", "RELU", "EXP", "SQUARED_DIFFERENCE", "EXP", "LOG"]
    tensors = [Tensor(f"t{i}", (1, 4), i8, q) for i in range(len(kinds) + 1)]
    ops = [Op(k, [i], [i + 1], {}, version=1) for i, k in enumerate(kinds)]
    with pytest.raises(ModelError) as e:
        load_tflite(to_bytes(_raw_model(tensors, ops, [0], [len(kinds)])))
    msg = str(e.value)
    assert "EXP x3 (at index 0, 2, 4)" in msg and "LOG x1 (at index 5)" in msg, msg
    assert "SQUARED_DIFFERENCE x1 (at index 3)" in msg and "5 of 6 ops" in msg, msg
    assert "RELU x" not in msg  # supported


def test_bad_tensor_index():
    q = QuantParams([0.05], [0])
    i8 = np.dtype(np.int8)
    tensors = [Tensor("x", (1, 4), i8, q), Tensor("y", (1, 4), i8, q)]
    data = to_bytes(_raw_model(tensors, [Op("RESHAPE", [7], [1], {}, version=1)], [0], [1]))
    with pytest.raises(ModelError, match="refers to tensor 7"):
        load_tflite(data)


def corrupt_and_load(data: bytes, x: np.ndarray, n: int, seed: int) -> tuple[int, int]:
    """Flip 1-4 random bytes of ``data`` ``n`` times: each result must be a Model that runs ``x``
    (or refuses it with ModelError) or a ModelError at load. Returns (loaded, refused)."""
    rng = np.random.default_rng(seed)
    loaded = refused = 0
    for _ in range(n):
        bad = bytearray(data)
        for pos in rng.integers(0, len(bad), size=rng.integers(1, 5)):
            bad[pos] = int(rng.integers(0, 256))
        try:
            m = load_tflite(bytes(bad))
        except ModelError:
            refused += 1
            continue
        loaded += 1
        try:
            m.predict(x)
        except ModelError:
            pass
    return loaded, refused


@pytest.mark.slow
def test_random_corruption_never_crashes():
    """Flip bytes all over a valid file: every result is a Model that runs or a ModelError."""
    loaded, refused = corrupt_and_load(fixture_path("digits_cnn").read_bytes(),
                                       fixture_data("digits_cnn")["x"][:2], 300, seed=1)
    assert loaded + refused == 300 and refused > 0


def test_forward_input_checks_leave_model_usable():
    m = load_tflite(fixture_path("digits_cnn"))
    d = fixture_data("digits_cnn")
    with pytest.raises(ModelError, match=r"takes int8, got float64"):
        m.forward(d["x"].astype(np.float64))
    with pytest.raises(ModelError, match=r"has shape \(N, 8, 8, 1\), got \(2, 8, 8\)"):
        m.forward(d["x"][:2, :, :, 0])
    with pytest.raises(ModelError, match="1 input"):
        m.forward(d["x"], d["x"])
    f = load_tflite(fixture_path("digits_cnn_floatio"))
    bad = fixture_data("digits_cnn_floatio")["x"][:2].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ModelError, match="NaN or inf"):
        f.predict(bad)
    np.testing.assert_array_equal(m.forward(d["x"]), d["y_builtin"])  # still fine


def test_unsupported_op_reading_a_state_tensor_is_named():
    """A recurrent op the engine lacks reads a variable (state) tensor no op writes: the error names
    the op, not 'reads tensor N before any op writes it'."""
    q = QuantParams([0.05], [3])
    i8 = np.dtype(np.int8)
    tensors = [Tensor("x", (1, 5, 4), i8, q), Tensor("w", (6, 4), i8, q, data=np.ones((6, 4), np.int8)),
               Tensor("r", (6, 6), i8, q, data=np.ones((6, 6), np.int8)),
               Tensor("b", (6,), np.dtype(np.int32), data=np.zeros(6, np.int32)),
               Tensor("state", (1, 6), i8, q, variable=True), Tensor("y", (1, 5, 6), i8, q)]
    ops = [Op("UNIDIRECTIONAL_SEQUENCE_RNN", [0, 1, 2, 3, 4], [5], {}, version=1)]
    with pytest.raises(ModelError, match=r"unsupported ops: UNIDIRECTIONAL_SEQUENCE_RNN x1 \(at index 0\)"):
        load_tflite(to_bytes(_raw_model(tensors, ops, [0], [5])))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm_ts", "lstm_unrolled", "conv1d_har_floatio", "squeezenet_mini"])
def test_random_corruption_of_zoo_models_never_crashes(name):
    """The reader paths the zoo added (intermediates, variable tensors, vector options, folding,
    ops with several outputs): corrupted files give a Model that runs or a ModelError."""
    from pathlib import Path
    zoo = Path(__file__).parent / "fixtures" / "zoo"
    loaded, refused = corrupt_and_load((zoo / f"{name}.tflite").read_bytes(),
                                       np.load(zoo / f"{name}.npz")["x"][:2], 100, seed=2)
    assert loaded + refused == 100 and refused > 0
