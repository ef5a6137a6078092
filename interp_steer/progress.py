"""One progress bar over a whole command (``demo``, ``study``), with an ETA learnt from the work done so far.

A command that knows its plan (how many training steps, captures, coherence probes and effect points of each
kind lie ahead) opens ``plan(counts, prior)``; the code doing the work calls ``tick(kind)`` after each unit.
The bar moves at every unit (a training step, a probe: seconds apart) and the ETA is, per kind, the units left
times the mean time of that kind so far; a kind not seen yet is priced by its ``prior`` (seconds, relative to
the other kinds) scaled by how the observed kinds compare with their priors. Outside a plan ``tick`` does
nothing, and the inner bars (training, captures, methods) show as before; inside one they stay quiet.

>>> with plan({"step": 24, "point": 40}, {"step": 7.0, "point": 6.0}, "demo"):  # doctest: +SKIP
...     train(...)   # ticks "step"
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Mapping

from tqdm.auto import tqdm


class Plan:
    """Units left per kind, their observed durations, and the bar."""

    def __init__(self, counts: Mapping[str, float], prior: Mapping[str, float], desc: str, enabled: bool = True):
        self.left = {k: float(v) for k, v in counts.items() if v > 0}
        self.prior = dict(prior)
        self.seen: dict[str, list[float]] = {}
        self.last = time.perf_counter()
        self.prefix = ""  # kinds are counted per model in a study: "MODEL:step"
        total = sum(n * self.prior.get(k, 1.0) for k, n in self.left.items())
        self.bar = tqdm(total=round(total, 2), desc=desc, disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}")

    def tick(self, kind: str, units: float = 1.0) -> None:
        kind = self.prefix + kind
        now = time.perf_counter()
        self.seen.setdefault(kind, []).append((now - self.last) / units)
        self.last = now
        if kind in self.left:
            done = min(units, self.left[kind])
            self.left[kind] -= done
            self.bar.update(round(done * self.prior.get(kind, 1.0), 2))
        self.bar.set_postfix_str(f"ETA {_clock(self.eta())}", refresh=False)
        self.bar.refresh()

    def add(self, kind: str, units: float) -> None:
        """More units of ``kind`` than planned (e.g. a budget search needed extra probes)."""
        kind = self.prefix + kind
        self.left[kind] = self.left.get(kind, 0.0) + units
        self.bar.total = round(self.bar.total + units * self.prior.get(kind, 1.0), 2)

    def eta(self) -> float:
        """Seconds left: observed mean per kind, priors scaled by observed/prior for unseen kinds."""
        mean = {k: sum(v) / len(v) for k, v in self.seen.items()}
        known = [k for k in mean if self.prior.get(k, 0) > 0]
        scale = (sum(mean[k] for k in known) / sum(self.prior[k] for k in known)) if known else 1.0
        return sum(n * mean.get(k, self.prior.get(k, 1.0) * scale) for k, n in self.left.items())

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


_current: Plan | None = None


@contextmanager
def plan(counts: Mapping[str, float], prior: Mapping[str, float], desc: str, enabled: bool = True
         ) -> Iterator[Plan]:
    """The command-wide bar for the ``with`` block (plans do not nest: an inner one is the outer one)."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = Plan(counts, prior, desc, enabled)
    try:
        yield _current
    finally:
        _current.close()
        _current = None


def tick(kind: str, units: float = 1.0) -> None:
    """One unit of ``kind`` done (nothing outside a plan)."""
    if _current is not None:
        _current.tick(kind, units)


def add(kind: str, units: float) -> None:
    if _current is not None:
        _current.add(kind, units)


def active() -> bool:
    """Whether a command-wide bar is showing (inner bars stay quiet then)."""
    return _current is not None
