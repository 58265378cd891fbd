"""Backoff schedules for `buttress.Retry`: how long to wait after attempt k failed.

A schedule gives a base delay for attempt k (k = 1, 2, ...) and a jitter scales it:

- ``"none"``: the base delay ``d``;
- ``"full"``: uniform in ``[0, d]`` (AWS "full jitter": spreads a herd of clients the most);
- ``"equal"``: ``d/2 + uniform[0, d/2]`` (never shorter than half the base);
- ``"decorrelated"``: ``min(maximum, uniform(initial, 3 * previous))`` (AWS "decorrelated jitter"),
  a random walk that ignores the base delay and grows from the previous wait (``initial`` the first time).

Any ``callable(attempt) -> seconds`` works as a schedule too; `Retry` accepts one directly.
Pass ``rng=random.Random(seed)`` for reproducible delays; without it the module-level generator is used.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

from ._params import check_float, check_int

__all__ = ["Backoff", "exponential", "constant", "linear", "JITTERS"]

JITTERS = ("none", "full", "equal", "decorrelated")

_MAX_SECONDS = 1e9      # same ceiling as every other duration in buttress (_params.seconds_to_ns)


class Backoff:
    """A backoff schedule: ``delay(attempt, previous=None) -> seconds``; also ``callable(attempt)``.

    Build one with `exponential`, `constant` or `linear`. `base(attempt)` is the delay before jitter.
    Immutable once built; safe to share between threads and `Retry` objects.
    """

    __slots__ = ("_base", "_describe", "initial", "maximum", "jitter", "_random")

    def __init__(self, base: Callable[[int], float], *, initial: float, maximum: float, jitter: str,
                 rng: random.Random | None, describe: str) -> None:
        self._base = base
        self._describe = describe
        self.initial = initial
        self.maximum = maximum
        self.jitter = _check_jitter(jitter)
        self._random = _check_rng(rng)

    def base(self, attempt: int) -> float:
        """The delay after `attempt` failed, before jitter (never above `maximum`)."""
        return self._base(_check_attempt(attempt))

    def delay(self, attempt: int, previous: float | None = None) -> float:
        """Seconds to wait after `attempt` (1, 2, ...) failed. `previous` is the last delay this
        schedule returned for the same call; only "decorrelated" jitter uses it (default: `initial`)."""
        jitter = self.jitter
        if jitter == "full":
            return self._base(_check_attempt(attempt)) * self._random()
        if jitter == "none":
            return self._base(_check_attempt(attempt))
        if jitter == "equal":
            half = self._base(_check_attempt(attempt)) / 2.0
            return half + half * self._random()
        # decorrelated: a random walk between `initial` and three times the previous wait
        _check_attempt(attempt)
        low = self.initial
        prev = low if previous is None else max(low, previous)
        return min(self.maximum, low + (3.0 * prev - low) * self._random())

    __call__ = delay

    def delays(self, attempts: int) -> Iterator[float]:
        """The delays after attempts 1 .. `attempts` of one call (threading `previous` through)."""
        prev = None
        for k in range(1, check_int("attempts", attempts, minimum=0) + 1):
            prev = self.delay(k, prev)
            yield prev

    def __repr__(self) -> str:
        return f"{self._describe}, jitter={self.jitter!r})"


def exponential(initial: float = 0.1, multiplier: float = 2.0, maximum: float = 30.0, jitter: str = "full",
                rng: random.Random | None = None) -> Backoff:
    """``min(maximum, initial * multiplier ** (attempt - 1))`` scaled by `jitter` (default "full")."""
    init = _seconds("initial", initial)
    mult = check_float("multiplier", multiplier, minimum=1.0, maximum=_MAX_SECONDS)
    cap = _seconds("maximum", maximum)
    if cap < init:
        raise ValueError(f"maximum must be >= initial={initial!r}, got {maximum!r}")
    assert mult is not None

    def base(attempt: int) -> float:
        try:
            return min(cap, init * mult ** (attempt - 1))
        except OverflowError:       # huge attempt numbers: the cap has long been reached (unless initial=0)
            return cap if init else 0.0

    return Backoff(base, initial=init, maximum=cap, jitter=jitter, rng=rng,
                   describe=f"exponential(initial={init!r}, multiplier={mult!r}, maximum={cap!r}")


def constant(delay: float = 1.0, jitter: str = "none", rng: random.Random | None = None) -> Backoff:
    """The same `delay` after every attempt, scaled by `jitter` ("none", "full" or "equal")."""
    d = _seconds("delay", delay)
    if jitter == "decorrelated":
        raise ValueError("jitter='decorrelated' grows from the previous delay and needs a maximum above the "
                         "first delay: use exponential(...) or linear(...); constant allows 'none', 'full', 'equal'")
    return Backoff(lambda attempt: d, initial=d, maximum=d, jitter=jitter, rng=rng,
                   describe=f"constant(delay={d!r}")


def linear(initial: float = 0.1, increment: float = 0.1, maximum: float = 30.0, jitter: str = "none",
           rng: random.Random | None = None) -> Backoff:
    """``min(maximum, initial + increment * (attempt - 1))`` scaled by `jitter`."""
    init = _seconds("initial", initial)
    inc = _seconds("increment", increment)
    cap = _seconds("maximum", maximum)
    if cap < init:
        raise ValueError(f"maximum must be >= initial={initial!r}, got {maximum!r}")
    return Backoff(lambda attempt: min(cap, init + inc * (attempt - 1)), initial=init, maximum=cap,
                   jitter=jitter, rng=rng,
                   describe=f"linear(initial={init!r}, increment={inc!r}, maximum={cap!r}")


def _seconds(name: str, value: object) -> float:
    s = check_float(name, value, minimum=0.0, maximum=_MAX_SECONDS)
    assert s is not None
    return s


def _check_jitter(jitter: object) -> str:
    if not isinstance(jitter, str):
        raise TypeError(f"jitter must be a str, one of {', '.join(map(repr, JITTERS))}, got {jitter!r}")
    if jitter not in JITTERS:
        raise ValueError(f"jitter must be one of {', '.join(map(repr, JITTERS))}, got {jitter!r}")
    return jitter


def _check_rng(rng: object) -> Callable[[], float]:
    """-> the rng's random() (the module-level generator's when rng is None)."""
    if rng is None:
        return random.random
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random instance or None, got {rng!r} ({type(rng).__name__})")
    return rng.random


def _check_attempt(attempt: int) -> int:
    # cheap on the hot path: one type check and one comparison; the full message only on misuse
    if type(attempt) is not int or attempt < 1:
        return check_int("attempt", attempt, minimum=1)
    return attempt
