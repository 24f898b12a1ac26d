"""The learned fusion model: L2-regularised logistic regression over candidate features, fitted by damped
Newton. One implementation, used by ``attrib tune`` (labelled benchmarks) and by anything else that learns
weights; its scores are log-odds, so one number ranks candidates, sets the "no source" threshold and gives
attribution shares."""
from __future__ import annotations

import math
import warnings

import numpy as np


def standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std over finite values (mean 0 / std 1 where a column has none or is constant)."""
    finite = np.where(np.isfinite(X), X, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mu = np.nanmean(finite, axis=0)
        sd = np.nanstd(finite, axis=0)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    sd = np.where(np.isfinite(sd) & (sd > 1e-9), sd, 1.0)
    return mu, sd


def standardize(X: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """(X - mu) / sd with missing (non-finite) values at 0, i.e. imputed with the mean."""
    Z = (X - np.asarray(mu)) / np.asarray(sd)
    return np.where(np.isfinite(Z), Z, 0.0)


def fit_logistic(Z: np.ndarray, y: np.ndarray, l2: float, iters: int = 100) -> tuple[np.ndarray, float]:
    """Damped Newton (backtracking line search) for L2-regularised logistic regression; the intercept is not
    penalised. Converges on separable or collinear data, where plain Newton steps can overshoot.
    Returns (weights, bias)."""
    n, m = Z.shape
    A = np.hstack([Z, np.ones((n, 1))])
    reg = np.full(m + 1, float(l2))
    reg[-1] = 0.0

    def loss(w: np.ndarray) -> float:
        z = A @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * w * w))

    w = np.zeros(m + 1)
    pos = min(max(float(y.mean()) if n else 0.5, 1e-6), 1 - 1e-6)
    w[-1] = math.log(pos / (1 - pos))
    f = loss(w)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(A @ w, -40, 40)))
        g = A.T @ (p - y) + reg * w
        H = (A * (p * (1 - p))[:, None]).T @ A + np.diag(reg) + 1e-6 * np.eye(m + 1)
        step = np.linalg.solve(H, g)
        t, decrease = 1.0, float(g @ step)
        while t > 1e-10:
            cand = w - t * step
            fc = loss(cand)
            if fc <= f - 1e-4 * t * decrease:
                break
            t *= 0.5
        else:
            break
        w, f_old, f = cand, f, fc
        if f_old - f < 1e-10 * max(1.0, abs(f_old)):
            break
    return w[:-1], float(w[-1])
