"""``FinishSteps``: the steps of a search's finish (and of ``raysft.promote``) that report on the
search rather than decide it, each run so that its failure is recorded and the rest goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from raysft.search import redact, tracking_requests

log = logging.getLogger(__name__)


class FinishSteps:
    """The finish's steps that report on a search rather than decide it (MLflow logging, base vs
    tuned, plots) and promotion: one that fails is logged and recorded in summary.json's
    ``failed_steps`` (after the MLflow records the trials' callback could not write), and the
    finish goes on: the search's results are never lost to a tracking server gone away or a
    plot that could not be drawn.

    ``mlflow`` and ``upload`` run steps that ask the tracking server. Once one finds it out of
    reach (``tracking_requests.out_of_reach``: each call has spent its retries by then), the later
    ones are not tried and are recorded as such: each would spend the same retries (tens of
    seconds on a server that takes connections and never answers), and ``--resume`` writes them
    all.
    An upload does not decide it (``upload``): its error may come from an artifact store that
    is not the tracking server. ``unreachable``: the step that found it so, if one did."""

    def __init__(self, unreachable: str | None = None) -> None:
        self.failures: list[str] = []
        self.unreachable = unreachable

    def run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None when it raised (recorded as ``what: reason``)."""
        return self._call(what, fn, args, kwargs)[0]

    def mlflow(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``run`` for a step that asks the tracking server."""
        return self._ask(what, fn, args, kwargs, decides=True)

    def upload(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``run`` for a step that uploads artifacts (and may log through the tracking server)."""
        return self._ask(what, fn, args, kwargs, decides=False)

    def found_out_of_reach(self, what: str) -> None:
        """Later MLflow steps are not tried: ``what`` found the tracking server out of reach."""
        if self.unreachable is None:
            self.unreachable = what
            log.warning(
                "the tracking server is out of reach (%s): the finish's later MLflow steps are "
                "not tried; --resume writes them once it is back",
                what,
            )

    def _ask(
        self, what: str, fn: Callable[..., Any], args: tuple, kwargs: dict, *, decides: bool
    ) -> Any:
        if self.unreachable is not None:
            log.debug(
                "%s: not tried (%s found the tracking server out of reach)", what, self.unreachable
            )
            self.failures.append(f"{what}: {tracking_requests.not_tried(self.unreachable)}")
            return None
        value, err = self._call(what, fn, args, kwargs)
        if err is not None and decides and tracking_requests.out_of_reach(err):
            self.found_out_of_reach(what)
        return value

    def _call(
        self, what: str, fn: Callable[..., Any], args: tuple, kwargs: dict
    ) -> tuple[Any, Exception | None]:
        try:
            return fn(*args, **kwargs), None
        except Exception as err:
            self._failed(what, redact.scrubbed(err))
            log.debug("%s failed", what, exc_info=True)
            return None, err

    def _failed(self, what: str, reason: str) -> None:
        log.warning("%s failed (%s); the search's summary is written without it", what, reason)
        self.failures.append(f"{what}: {reason}")
