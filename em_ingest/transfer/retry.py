"""One retry policy for every transport: exponential backoff with jitter, Retry-After honoured."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC
from typing import TypeVar

import tenacity

from em_ingest.settings import TransferSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryableError(Exception):
    """A failure worth another attempt (connection cut, 5xx, 429, truncated body)."""

    def __init__(self, message: str, *, url: str, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.url = url
        self.status = status
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _wait(settings: TransferSettings) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential_jitter(
        multiplier=settings.backoff_initial_s, max=settings.backoff_max_s, jitter=settings.backoff_initial_s
    )

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableError) and exc.retry_after_s is not None:
            # The server said when to come back; never wait longer than the policy allows.
            return min(exc.retry_after_s, settings.backoff_max_s)
        return backoff(state)

    return wait


def call_with_retries(
    fn: Callable[[], T], settings: TransferSettings, *, describe: str, on_give_up: Callable[[RetryableError], Exception]
) -> T:
    """Call `fn` until it succeeds, retrying RetryableError within the attempt and time budget."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("retrying %s after attempt %d: %s", describe, state.attempt_number, exc)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(RetryableError),
        stop=tenacity.stop_after_attempt(settings.max_attempts) | tenacity.stop_after_delay(settings.max_retry_time_s),
        wait=_wait(settings),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except RetryableError as exc:
        raise on_give_up(exc) from exc
