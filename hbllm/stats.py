"""Noise of repeated runs: group runs that differ only by ``seed``/``repeat``, summarise each
group, and say whether two groups differ by more than their spread.

* :func:`group_key` names a config without its repeat axes (``seed``: calibration sample;
  ``repeat``: float-order jitter, see :mod:`hbllm.jitter`): runs with the same key are repeats.
* :func:`summarize` gives n, mean, std, min, max of a metric; perplexities are summarised on the
  log scale (geometric mean and geometric std, a factor: ``gstd`` 1.10 means "x/ 1.10").
* :func:`compare` is the documented test of docs/sweeps.md, on log-perplexity (ratios of
  perplexity are what matter; a 1-bit model's perplexity spreads multiplicatively). Default
  ``welch``: two-sided Welch t-test (unequal variances; assumes log-perplexity roughly normal
  over seeds; works from 2 runs a side). ``mannwhitney``: two-sided Mann-Whitney U rank test
  (no normality assumption, exact for small samples, but needs 4 + 4 runs, or 3 + 5, before
  any p can fall below 0.05: :func:`min_p_value`). A difference is ``significant`` when
  p < ``ALPHA``, else ``within noise``; ``untested`` when the test cannot say anything (one run
  on a side, or too few runs for the rank test) -- a single run carries no noise estimate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# the run-config fields that repeat a config rather than change it
REPEAT_KEYS = ("seed", "repeat")
ALPHA = 0.05

SIGNIFICANT, WITHIN_NOISE, UNTESTED = "significant", "within noise", "untested"


def group_key(config: dict[str, Any]) -> str:
    """The identity of a resolved config without its seed and repeat
    (:func:`hbllm.results.experiment_id`): the runs of one config over seeds/repeats share it."""
    from .results import experiment_id

    return experiment_id({k: v for k, v in config.items() if k not in REPEAT_KEYS})


@dataclass
class Summary:
    """n values of one metric. For ``log=True`` (perplexity) ``mean`` is the geometric mean and
    ``std`` the geometric standard deviation (a factor >= 1; 1.0 for n = 1)."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    log: bool

    def format(self, digits: int = 4) -> str:
        """``226.3 (x/1.12, 198.1-268.7)`` or, for one value, ``226.3``."""
        g = lambda v: f"{v:.{digits}g}"  # noqa: E731
        if self.n == 1:
            return g(self.mean)
        spread = f"x/{self.std:.3g}" if self.log else f"+-{self.std:.3g}"
        return f"{g(self.mean)} ({spread}, {g(self.min)}-{g(self.max)})"


def summarize(values: Sequence[float], log: bool = False) -> Summary | None:
    """Summary of the finite ``values`` (None when there are none). ``log``: geometric."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    xs = [math.log(v) for v in vals] if log else vals
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    if log:
        mean, std = math.exp(mean), math.exp(std)
    return Summary(n, mean, std, min(vals), max(vals), log)


def min_p_value(n_a: int, n_b: int) -> float:
    """The smallest two-sided p-value an exact Mann-Whitney test can give for n_a vs n_b
    values: 2 / C(n_a + n_b, n_a) (complete separation)."""
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


@dataclass
class Comparison:
    """``b`` against ``a``: ratio of geometric means (b / a), the test's p-value, the verdict."""

    ratio: float
    p: float | None
    verdict: str
    n_a: int
    n_b: int

    def format(self) -> str:
        if self.verdict == UNTESTED:
            return f"{self.ratio:#.3g}x {UNTESTED} (n={self.n_a}+{self.n_b})"
        return f"{self.ratio:#.3g}x {self.verdict} (p={self.p:.2g})"


TESTS = ("welch", "mannwhitney")


def compare(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA,
            test: str = "welch") -> Comparison:
    """Whether perplexities ``b`` differ from ``a`` beyond their run-to-run spread: a two-sided
    ``test`` (``welch`` or ``mannwhitney``, see the module doc) on log-perplexity."""
    from scipy.stats import mannwhitneyu, ttest_ind

    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    la = [math.log(v) for v in a if v is not None and math.isfinite(v) and v > 0]
    lb = [math.log(v) for v in b if v is not None and math.isfinite(v) and v > 0]
    if not la or not lb:
        raise ValueError("compare() needs at least one finite positive value on each side")
    ratio = math.exp(sum(lb) / len(lb) - sum(la) / len(la))
    if test == "mannwhitney":
        if min_p_value(len(la), len(lb)) >= alpha:
            return Comparison(ratio, None, UNTESTED, len(la), len(lb))
        p = float(mannwhitneyu(la, lb, alternative="two-sided").pvalue)
    else:
        if len(la) < 2 or len(lb) < 2:
            return Comparison(ratio, None, UNTESTED, len(la), len(lb))
        if len(set(la)) == 1 and len(set(lb)) == 1:  # no spread on either side
            p = 1.0 if la[0] == lb[0] else 0.0
        else:
            p = float(ttest_ind(la, lb, equal_var=False).pvalue)
    return Comparison(ratio, p, SIGNIFICANT if p < alpha else WITHIN_NOISE, len(la), len(lb))
