"""How hard raysft asks the MLflow tracking server: request retries and timeouts (a search's,
the trials' callback's, once only), what counts as the server out of reach, and the callback's
record of the writes it could not make."""

from __future__ import annotations

import contextlib
import os

from raysft.environ import environ
from raysft.errors import chain

# MLflow retries an HTTP request for minutes (7 times, with backoff): the store check before
# Ray starts asks once, and so does the whole process once the trials' callback has failed.
FAST_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0, "MLFLOW_HTTP_REQUEST_TIMEOUT": 10}
# A search's driver asks 3 more times: at once, then after about 2 and 4 s (urllib3's schedule,
# plus MLflow's jitter), and what a failed call could not write is written at the finish
# (``complete_trial_run``) or by --resume. A value set in the environment is kept. Each waits up
# to 30 s for an answer, not MLflow's 120: a server that takes connections and never answers (a
# hung process, packets dropped on the way) held the trials 8 minutes at a time. An artifact
# upload is not cut short: the wait is for the server's next bytes.
# A 429 or 503's Retry-After header is not waited for: urllib3 honours up to 6 hours of it, which
# would hold every trial's report (a callback write waited 55 s for "Retry-After: 55").
_SEARCH_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}
# The trials' callback asks less of a server: every trial's report waits for Tune's loop, where
# it runs. Its requests wait 10 s for an answer and are retried once: about 20 s on a server that
# takes connections and never answers, against 127 s at the figures above (Tune's log, on a
# frozen server). A lower value in the environment is kept. After its first failure the whole
# process asks once (``note_callback_failure``); what the callback could not write, the finish
# writes.
_CALLBACK_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 1, "MLFLOW_HTTP_REQUEST_TIMEOUT": 10}
# After the trials' callback finds the tracking server out of reach, it leaves MLflow alone
# for this long, then asks again; each failure again doubles the wait, up to the last figure.
QUIET_S = (30.0, 300.0)


def out_of_reach(err: BaseException) -> bool:
    """Whether an MLflow error is the tracking server not answering (refused, timed out,
    retries spent on 5xx answers), as opposed to a request it answered and refused (an
    ``HTTPError``: an artifact upload's 4xx, for one)."""
    from requests.exceptions import HTTPError, RequestException

    return any(isinstance(e, RequestException) and not isinstance(e, HTTPError) for e in chain(err))


def not_tried(found_by: str) -> str:
    """Why a finish step did not ask MLflow: ``found_by`` found the tracking server out of
    reach earlier in the same finish."""
    return f"not tried (the tracking server was out of reach at: {found_by})"


def bound_retries() -> None:
    """This process's MLflow requests retried as a search's are (``_SEARCH_RETRIES``)."""
    for name, value in _SEARCH_RETRIES.items():
        os.environ.setdefault(name, value)


def _capped(caps: dict[str, int]) -> dict[str, str]:
    """Each of MLflow's request variables in ``caps`` at most its cap: a lower value already in
    the environment is kept, an unset one gets the cap."""
    out = {}
    for name, cap in caps.items():
        try:
            out[name] = str(min(int(os.environ.get(name) or cap), cap))
        except ValueError:  # MLflow would refuse it at the request: its own message then
            continue
    return out


def _cap_environ(caps: dict[str, int]) -> None:
    """``_capped`` in the process's environment."""
    os.environ.update(_capped(caps))


def ask_once_from_now() -> None:
    """This process's MLflow requests asked once, without retries (``FAST_REQUESTS``; lower
    figures in the environment stay): the tracking server was found out of reach."""
    _cap_environ(FAST_REQUESTS)


def capped_environ(caps: dict[str, int]) -> contextlib.AbstractContextManager[None]:
    """``_cap_environ`` for the block; the process's values are back after it."""
    return environ(_capped(caps))


def callback_requests() -> contextlib.AbstractContextManager[None]:
    """MLflow's requests in the block retried and timed as the trials' callback's are
    (``_CALLBACK_REQUESTS``, or the process's values where lower); the process's values are back
    after it. MLflow reads them at each request. Tune's loop, in the driver's main thread, is the
    only MLflow caller while trials run, so no other request sees them."""
    return capped_environ(_CALLBACK_REQUESTS)


# What the trials' callback could not write to MLflow, kept here (not on the callback): after
# --resume Tune drives the copy of the callback it pickled when the search began, which the
# driver never sees; a module-level function is pickled by reference and reaches this list.
_CALLBACK_FAILURES: list[str] = []
_CALLBACK_FAILURES_SHOWN = 5  # listed one by one; the rest counted


def note_callback_failure(line: str) -> None:
    """Note one failed MLflow write of the callback. After the first, MLflow asks once per call
    (no retries, ``FAST_REQUESTS``; lower figures in the environment stay): a server down for
    good would otherwise hold every report, and the trials with it (a trial's report waits for
    Tune's loop), and the finish would spend the search's retries on each of its steps."""
    ask_once_from_now()
    _CALLBACK_FAILURES.append(line)


def callback_failures(*, reset: bool = False) -> list[str]:
    """The callback's failed MLflow writes since the last reset, the first few by name and the
    rest counted; ``reset`` empties the record (a search's start)."""
    lines = list(_CALLBACK_FAILURES[:_CALLBACK_FAILURES_SHOWN])
    more = len(_CALLBACK_FAILURES) - len(lines)
    if more > 0:
        lines.append(f"MLflow: {more} more of the trials' records not written (see the log)")
    if reset:
        _CALLBACK_FAILURES.clear()
    return lines
