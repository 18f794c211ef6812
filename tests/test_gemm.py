"""kernels/gemm.py against an int64 numpy product: every block edge (rows and columns not
multiples of 4, fewer than 4 columns), the extreme int16 values, and sums near the int32 limit."""
from __future__ import annotations

import numpy as np
import pytest

from edge_qmul.kernels.gemm import gemm_i16


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ b.T.astype(np.int64)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 7, 3), (3, 5, 4), (4, 4, 4), (5, 9, 6), (7, 130, 13),
                                   (64, 576, 64), (13, 2, 1), (2, 33, 5)])
def test_gemm_matches_int64_reference(m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.integers(-255, 256, (m, k)).astype(np.int16)
    b = rng.integers(-127, 128, (n, k)).astype(np.int16)
    c = np.full((m, n), 12345, np.int32)  # every element must be written
    gemm_i16(a, b, c)
    np.testing.assert_array_equal(c, _reference(a, b))


def test_gemm_extreme_values_and_large_sums():
    # int16 errors times int8 weights, as the input gradient uses it: |sum| up to 2^15 * 127 * k
    k = 500  # 2^15 * 127 * 500 = 2.08e9 < 2^31 - 1
    a = np.full((6, k), -(2 ** 15), np.int16)
    b = np.full((5, k), -127, np.int16)
    c = np.zeros((6, 5), np.int32)
    gemm_i16(a, b, c)
    assert int(c[0, 0]) == 2 ** 15 * 127 * k
    np.testing.assert_array_equal(c, _reference(a, b))
    b[::2] = 127
    gemm_i16(a, b, c)
    np.testing.assert_array_equal(c, _reference(a, b))
