"""What a model that never saw the forget set would say about it, estimated from the retain set.

A forget sample whose nearest retain samples (input space) out-vote its label is one that only
memorization explains: a planted trigger (a canary), a mislabelled sample, an outlier. A model
retrained without it predicts its neighbours' label, not the stored one. Two things follow:

- the stopping rule's level (held-out accuracy) does not describe such a forget set: a model that
  never saw it gets the contradicted samples wrong. The rule is off for it and the budget ends the
  run (loop.StoppingRule says what was measured). ``excess``, the share of the forget set only
  memorization explains (``max(0, d_f - d_v)``, the contradicted fractions of the forget set and
  of the validation slice), is reported;
- forgetting such a sample means moving it to its neighbours' label (``votes``), which the methods
  that relabel (oeu, qmul) use as its target.

Both apply only when the forget set holds significantly more contradicted samples than the validation
slice (one-sided Fisher exact test, ``ALPHA``): on an ordinary forget set nothing changes, bit for
bit. Distances are exact (integer inputs, float64 sums below 2**53); ties go to the lower retain index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.01          # the Fisher test's level: how sure before the forget set is treated as atypical
BLOCK_BYTES = 32 << 20  # distance rows computed at a time (float64)


@dataclass(frozen=True)
class NeverSeen:
    """The retain set's verdict on a forget set (see the module docstring)."""

    contradicted: np.ndarray      # (N_f,) bool: the neighbours out-vote the stored label
    votes: np.ndarray             # (N_f,) int64: the neighbours' label (the stored one when not contradicted)
    validation_contradicted: np.ndarray  # (N_v,) bool, the same for the validation slice
    p_value: float                # one-sided Fisher: more contradicted in the forget set than in validation
    significant: bool             # p_value < ALPHA: the estimate is used

    @property
    def excess(self) -> float:
        """max(0, d_f - d_v): the share of the forget set only memorization explains."""
        d_f = float(self.contradicted.mean()) if self.contradicted.size else 0.0
        v = self.validation_contradicted
        return max(0.0, d_f - (float(v.mean()) if v.size else 0.0))

    def summary(self) -> dict:
        return {"contradicted": int(self.contradicted.sum()), "forget": int(self.contradicted.size),
                "validation_contradicted": int(self.validation_contradicted.sum()),
                "validation": int(self.validation_contradicted.size), "p_value": self.p_value,
                "significant": self.significant, "excess": self.excess}


def neighbour_votes(x_query: np.ndarray, x_retain: np.ndarray, y_retain: np.ndarray, k: int,
                    num_classes: int) -> np.ndarray:
    """(N_q, C) int64: how many of each query's ``k`` nearest retain samples (squared Euclidean
    distance on the raw integer inputs) carry each label."""
    q = np.asarray(x_query).reshape(len(x_query), -1).astype(np.float64)
    r = np.asarray(x_retain).reshape(len(x_retain), -1).astype(np.float64)
    y_retain = np.asarray(y_retain, dtype=np.int64)
    k = min(k, len(r))
    r_sq = np.einsum("ij,ij->i", r, r)
    counts = np.zeros((len(q), num_classes), np.int64)
    rows = max(1, BLOCK_BYTES // (8 * max(1, len(r))))
    for s in range(0, len(q), rows):
        block = q[s:s + rows]
        # |q|^2 is the same along a row, so it does not change the order
        d = r_sq[None, :] - 2.0 * (block @ r.T)
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        labels = y_retain[nearest]
        for c in range(num_classes):
            counts[s:s + rows, c] = (labels == c).sum(axis=1)
    return counts


def _contradicted(counts: np.ndarray, y: np.ndarray, taught: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flags and votes; only a label the retain set still teaches (``taught[label]``) can be
    contradicted: a class with no retain sample is a class being forgotten whole, the regime of
    CLASS_FORGETTING, not memorization."""
    y = np.asarray(y, dtype=np.int64)
    own = counts[np.arange(len(y)), y]
    top = counts.argmax(axis=1)  # ties: the lower class
    flags = (own < counts.max(axis=1)) & taught[y]
    return flags, np.where(flags, top, y)


def fisher_greater(a: int, n_a: int, b: int, n_b: int) -> float:
    """One-sided Fisher exact test: P(at least ``a`` of the ``a + b`` events fall in the first group
    of ``n_a``, out of ``n_a + n_b``), the hypergeometric upper tail, exact in integers."""
    total, events = n_a + n_b, a + b
    denom = math.comb(total, events)
    tail = sum(math.comb(n_a, i) * math.comb(n_b, events - i) for i in range(a, min(n_a, events) + 1))
    return float(tail / denom) if denom else 1.0


def never_seen(forget, retain, validation, k: int, num_classes: int) -> NeverSeen:
    """The retain set's ``k``-nearest-neighbour verdict on the forget set and the validation slice."""
    (xf, yf), (xr, yr), (xv, yv) = forget, retain, validation
    taught = np.bincount(np.asarray(yr, np.int64), minlength=num_classes) > 0
    flags, votes = _contradicted(neighbour_votes(xf, xr, yr, k, num_classes), yf, taught)
    v_flags, _ = _contradicted(neighbour_votes(xv, xr, yr, k, num_classes), yv, taught) if len(xv) else \
        (np.zeros(0, bool), None)
    p = fisher_greater(int(flags.sum()), len(flags), int(v_flags.sum()), len(v_flags))
    return NeverSeen(flags, votes, v_flags, p, p < ALPHA)
