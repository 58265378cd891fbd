"""The one error hierarchy of buttress.

Every error is a ButtressError. Rejections (the call was refused before it ran) are `Rejected`
and carry ``retry_after``: seconds until trying again makes sense, or None when unknown. A Rejected built
by its constructor checks it (None or a finite number >= 0, as a float); `rejection` / `lazy_rejection`
and refusals built in C take the value the pattern computed, which is valid by construction.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._params import check_float

if TYPE_CHECKING:
    from types import GetSetDescriptorType
    from typing import TypeVar

    R = TypeVar("R", bound="Rejected")

__all__ = ["ButtressError", "Rejected", "CircuitOpenError", "RateLimitExceeded", "BulkheadFullError",
           "Overloaded", "TimeoutExceeded"]


def _check_retry_after(value: object) -> float | None:
    """None or a finite number of seconds >= 0 (ValueError / TypeError naming retry_after otherwise)."""
    if value is None or type(value) is float and 0.0 <= value < 1e308:     # the common case: no call
        return value
    return check_float("retry_after", value, minimum=0.0, allow_none=True)


def rejection(cls: type[R], message: str, retry_after: float | None = None) -> R:
    """``cls(message, retry_after=retry_after)`` for a Rejected subclass with the default constructor, built
    without running the Python ``__init__`` chain (a refusal is the hot path under overload): the same
    ``args``, ``str()``, ``retry_after`` and pickling. Internal."""
    exc = cls.__new__(cls, message)
    if retry_after is not None:
        exc.retry_after = retry_after
    return exc


def lazy_rejection(cls: type[R], fmt: str, values: tuple[object, ...], retry_after: float | None = None) -> R:
    """`rejection` with the message ``fmt % values`` formatted only when someone reads it. Internal."""
    exc = cls.__new__(cls)
    exc._lazy = (fmt, values)
    if retry_after is not None:
        exc.retry_after = retry_after
    return exc


class ButtressError(Exception):
    """Base of every error buttress raises."""

    retry_after: float | None = None


# the C-level args slot (a getset descriptor; typeshed declares BaseException.args as the tuple it yields)
_ARGS: GetSetDescriptorType = BaseException.args  # type: ignore[assignment]


class Rejected(ButtressError):
    """A call refused before it ran. Retry never retries these unless `retry_on` names them.

    A refusal built by `lazy_rejection` carries its message as (format, values) and formats it on first
    use (str, repr, args, pickling): under overload most refusals are counted and dropped unread."""

    _lazy: tuple[str, tuple[object, ...]]      # set only by lazy_rejection (popped when materialised)

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.retry_after = _check_retry_after(retry_after)
        super().__init__(message if message is not None else self._default_message())

    def _materialise(self) -> None:
        lazy = self.__dict__.pop("_lazy", None)
        if lazy is not None:
            _ARGS.__set__(self, (lazy[0] % lazy[1],))

    @property
    def args(self) -> tuple[Any, ...]:
        self._materialise()
        return _ARGS.__get__(self)  # type: ignore[no-any-return]

    @args.setter
    def args(self, value: tuple[Any, ...]) -> None:
        self.__dict__.pop("_lazy", None)
        _ARGS.__set__(self, value)

    def __str__(self) -> str:
        self._materialise()
        return super().__str__()

    def __repr__(self) -> str:
        self._materialise()
        return super().__repr__()

    def __reduce__(self) -> str | tuple[Any, ...]:
        self._materialise()
        return super().__reduce__()

    def _default_message(self) -> str:
        if self.retry_after is None:
            return "rejected"
        return f"rejected; retry after {self.retry_after:.6g}s"


class CircuitOpenError(Rejected):
    """The circuit breaker `name` refused the call; `state` is the breaker's state then."""

    def __init__(self, name: str, state: object, retry_after: float | None = None,
                 message: str | None = None) -> None:
        retry_after = _check_retry_after(retry_after)
        self.name = name
        self.state = state
        state_name = getattr(state, "name", state)
        if message is None:
            message = f"circuit breaker {name!r} is {state_name}"
            if retry_after is not None:
                message += f"; retry after {retry_after:.6g}s"
        super().__init__(message, retry_after=retry_after)

    def __reduce__(self) -> tuple[Any, ...]:  # keep picklable despite the custom signature
        return (type(self), (self.name, self.state, self.retry_after, str(self)))


class RateLimitExceeded(Rejected):
    """A rate limiter refused the call."""

    def _default_message(self) -> str:
        return "rate limit exceeded" + ("" if self.retry_after is None else f"; retry after {self.retry_after:.6g}s")


class BulkheadFullError(Rejected):
    """A bulkhead had no permit free (within its max_wait)."""

    def _default_message(self) -> str:
        return "bulkhead full"


class Overloaded(Rejected):
    """A load shedder shed the call. `signals`: the names of the overload signals that shed it (e.g.
    ``("loop_lag",)``: `buttress.shedding.LoopLag`, `CpuUsage`, `QueueDepth`); empty when it was shed by
    the in-flight count or a drain."""

    signals: tuple[str, ...] = ()       # class default: the fast refusals (lazy_rejection) have none

    def __init__(self, message: str | None = None, *, retry_after: float | None = None,
                 signals: tuple[str, ...] | list[str] = ()) -> None:
        if not isinstance(signals, (tuple, list)) or not all(isinstance(s, str) for s in signals):
            raise TypeError(f"signals must be a tuple of signal names (str), got {signals!r}")
        super().__init__(message, retry_after=retry_after)
        if signals:
            self.signals = tuple(signals)

    def _default_message(self) -> str:
        return "overloaded" + ("" if self.retry_after is None else f"; retry after {self.retry_after:.6g}s")


class TimeoutExceeded(ButtressError, TimeoutError):
    """The call did not finish within its timeout or deadline."""

    def __init__(self, message: str = "timeout exceeded", *, timeout: float | None = None) -> None:
        self.timeout = timeout
        super().__init__(message)
