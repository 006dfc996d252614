"""The one exception type for bad configuration or input that stops a job with one sentence."""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem the user can fix: the message is one sentence, shown as is, without a traceback."""


def find_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind an exception that Ray raised for a worker's, if there is one.

    Ray wraps a task's or a Train worker's exception (RayTaskError's ``cause``, Train's
    ``worker_failures``, Ray Data's chained UserCodeException); the one sentence is inside.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: its str is a whole traceback
        if isinstance(e, ConfigError) and not isinstance(cause, BaseException):
            return ConfigError(str(e))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    return None
