"""Standard errors of the numbers the library and its benchmarks report: one place for the convention.

Accuracies and agreement rates are means of 0/1 outcomes per image; their standard error is the sample standard
deviation over sqrt(n). Two methods scored on the same images are compared by their paired difference, whose
standard error is that of the per-image differences (far smaller than either accuracy's when they mostly agree).
"""

from __future__ import annotations

import numpy as np


def standard_error(values, ddof: int = 1) -> float:
    """Standard error of the mean of `values` (ddof=0: the binomial sqrt(p (1 - p) / n) for 0/1 outcomes, the
    convention of Winoground's reference scores); NaN when there are too few values."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n <= ddof or n == 0:
        return float("nan")
    return float(values.std(ddof=ddof) / np.sqrt(n))


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of a - b over the same items, and its standard error."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), standard_error(d)
