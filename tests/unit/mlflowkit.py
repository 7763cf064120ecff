"""A helper for the tests of what raysft does when its tracking server goes away (imported by
test_results and test_finish): a real MLflow client behind a link that can go down."""

from __future__ import annotations

from typing import Any


class OutOfReach:
    """A real MLflow client behind a link that can go down: while ``down``, every call fails as
    MLflow fails when its server does not answer (an MlflowException raised while handling
    requests' ConnectionError). ``calls`` counts what was asked."""

    def __init__(self, mlc: Any) -> None:
        self.mlc, self.down, self.calls = mlc, True, 0
        self.refuse: set[str] = set()  # methods the server answers with a refusal ("*": all)
        self.only: set[str] = set()  # while down, only these methods fail (empty: all)
        self.down_from: str | None = None  # the link goes down at the first call of this method

    def __getattr__(self, name: str) -> Any:
        import requests
        from mlflow.exceptions import MlflowException

        method = getattr(self.mlc, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if name == self.down_from:
                self.down = True
            if name in self.refuse or "*" in self.refuse:  # the server is there and says no
                raise MlflowException(f"/{name}: RESOURCE_DOES_NOT_EXIST")
            if self.down and (not self.only or name in self.only):
                try:
                    raise requests.exceptions.ConnectionError("Connection refused")
                except requests.exceptions.ConnectionError as err:
                    # As rest_utils.http_request raises it: no `from`, the cause is its context.
                    raise MlflowException(f"API request to /{name} failed with exception {err}")  # noqa: B904
            return method(*args, **kwargs)

        return call
