"""Student's t distribution and a mean's confidence interval, with the standard library only.

scipy is not a dependency of this package, so the t CDF is computed here from the regularised incomplete beta
function (a continued fraction, evaluated with the modified Lentz method) and inverted by bisection. For the
degrees of freedom a comparison has (seeds - 1) both are accurate to about 1e-12, far beyond the 3 decimals a
report prints; the tests check them against published table values and, when mpmath is installed, against
arbitrary precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist

_TINY = 1e-300
_EPS = 1e-15
_MAX_TERMS = 100_000
#: From this many degrees of freedom on, the normal distribution is used (it differs from t by under 1e-7).
_NORMAL_DF = 1e7


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Numerical Recipes' ``betacf``)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _regularized_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) with ``y = 1 - x`` passed separately, so neither is computed by cancellation."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, y) / b


def _check_df(df: float) -> None:
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df!r}")


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (``math.inf`` gives the normal distribution)."""
    _check_df(df)
    if math.isnan(t):
        return math.nan
    if df >= _NORMAL_DF:
        return NormalDist().cdf(t)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom: the t with ``student_t_cdf(t, df) == p``.

    Closed forms for 1 and 2 degrees of freedom and the normal limit; otherwise bisection on the CDF, which
    always converges because the CDF is monotone.
    """
    _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be strictly between 0 and 1, got {p!r}")
    if p == 0.5:
        return 0.0
    if df >= _NORMAL_DF:
        return NormalDist().inv_cdf(p)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, max(1.0, 2.0 * NormalDist().inv_cdf(p))
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_confidence_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite `values`: a two-sided Student t interval for their mean.

    The interval needs two values (one degree of freedom); with fewer, low and high are NaN, and with none the
    mean is NaN too. Identical values give a zero-width interval at their mean.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = math.fsum(finite) / n
    if n == 1:
        return mean, math.nan, math.nan, 1
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n
