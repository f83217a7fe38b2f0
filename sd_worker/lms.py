"""LMS without scipy: diffusers integrates the LMS coefficients with `scipy.integrate.quad`; the integrand is
a polynomial of degree < 4, so Gauss-Legendre quadrature with 4 nodes is exact."""

from __future__ import annotations

import numpy as np
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(4)


class NumpyLMSDiscreteScheduler(LMSDiscreteScheduler):
    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sigmas = [float(s) for s in self.sigmas]
        lo, hi = sigmas[t], sigmas[t + 1]
        taus = (hi - lo) / 2 * _NODES + (hi + lo) / 2
        values = np.ones_like(taus)
        for k in range(order):
            if k != current_order:
                values *= (taus - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
        return float((hi - lo) / 2 * np.dot(_WEIGHTS, values))
