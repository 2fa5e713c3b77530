"""The two tiny learners the policy is made of, in numpy: logistic regression and isotonic regression.

Both are fitted in the build on a few hundred rows, so plain Newton steps and the
pool-adjacent-violators algorithm are all that is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


@dataclass
class Logistic:
    """P(y = 1 | x) = sigmoid(w · (x − mean) / scale + b)."""
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def predict(self, x) -> np.ndarray:
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weights + self.bias
        return sigmoid(z)


def fit_logistic(x, y, *, l2: float = 1.0, iters: int = 50) -> Logistic:
    """L2-penalised logistic regression by Newton's method on standardised features.

    The penalty (on the weights and, lightly, the bias) keeps the fit finite when the
    classes separate or when every label is the same.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"fit_logistic: need x [n, d] and y [n] with n > 0, got {x.shape} and {y.shape}")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 1e-3 * l2
    theta = np.zeros(z.shape[1])
    for _ in range(iters):
        p = sigmoid(z @ theta)
        grad = z.T @ (p - y) + penalty * theta
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return Logistic(mean, scale, theta[:-1], float(theta[-1]))


@dataclass
class Isotonic:
    """A non-decreasing map: linear between block centres `xs` (strictly increasing) of values `ys`, flat outside."""
    xs: np.ndarray
    ys: np.ndarray
    fitted: np.ndarray | None = None  # the PAV step values at the training points, in their order

    def predict(self, x) -> np.ndarray:
        return np.interp(np.asarray(x, dtype=np.float64), self.xs, self.ys)


def fit_isotonic(x, y, weights=None) -> Isotonic:
    """Pool adjacent violators: the least-squares non-decreasing fit of y on x.

    Equal x are pooled first (one value per x); each final block is represented by its
    weighted mean x and its value, and block values increase strictly, so the
    interpolated map is monotone and not flat between blocks.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.shape != w.shape or len(x) == 0:
        raise ValueError(f"fit_isotonic: need x, y, weights of one equal length > 0, got {x.shape}, {y.shape}, {w.shape}")
    order = np.argsort(x, kind="stable")
    x, y, w = x[order], y[order], w[order]
    ux, start = np.unique(x, return_index=True)
    sw = np.add.reduceat(w, start)
    sy = np.add.reduceat(w * y, start)
    sx = np.add.reduceat(w * x, start)
    # Stack of blocks: total weight, weighted sum of y, weighted sum of x.
    bw: list[float] = []
    bn: list[int] = []  # distinct x values per block
    by: list[float] = []
    bx: list[float] = []
    for i in range(len(ux)):
        bw.append(sw[i]), by.append(sy[i]), bx.append(sx[i]), bn.append(1)
        while len(bw) > 1 and by[-2] / bw[-2] >= by[-1] / bw[-1]:
            w2, y2, x2, n2 = bw.pop(), by.pop(), bx.pop(), bn.pop()
            bw[-1] += w2
            by[-1] += y2
            bx[-1] += x2
            bn[-1] += n2
    bw_a = np.array(bw)
    values = np.array(by) / bw_a
    per_x = np.repeat(values, bn)                       # one value per distinct x
    fitted = np.empty_like(y)
    fitted[order] = per_x[np.searchsorted(ux, x)]
    return Isotonic(np.array(bx) / bw_a, values, fitted)
