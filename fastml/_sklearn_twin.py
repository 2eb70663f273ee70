"""fastml's errors and warnings as scikit-learn's too, where scikit-learn is installed.

fastml's estimators raise their own NotFittedError and InvalidParameterError and warn their own
DataConversionWarning and UndefinedMetricWarning (scikit-learn is optional). scikit-learn's tools
and check_estimator catch and filter by their own classes, so what fastml raises is, where
scikit-learn is installed, an instance of a subclass of both: ``twin(NotFittedError)(message)``.
scikit-learn is imported on that path only: it takes about a second to import.
"""

from __future__ import annotations

import importlib

_TWINS: dict[type, type] = {}


def twin(cls: type) -> type:
    """``cls``, or where scikit-learn is installed a subclass of it that is also scikit-learn's
    class of the same name (``_HOMES``)."""
    if cls not in _TWINS:
        theirs = _sklearn_class(cls.__name__)
        _TWINS[cls] = cls if theirs is None else type(
            cls.__name__, (cls, theirs), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                          "__doc__": cls.__doc__, "__reduce__": _reduce})
    return _TWINS[cls]


# Where scikit-learn keeps the classes fastml's mirror: its public exceptions, then the parameter
# validation's InvalidParameterError (a private module, public in what its estimators raise).
_HOMES = ("sklearn.exceptions", "sklearn.utils._param_validation")


def _sklearn_class(name: str) -> type | None:
    """scikit-learn's class ``name``, or None where scikit-learn (or that class) is absent."""
    for home in _HOMES:
        try:
            found = getattr(importlib.import_module(home), name, None)
        except ImportError:
            return None
        if isinstance(found, type):
            return found
    return None


def _reduce(self):
    # pickle cannot find the twin by its name (which is fastml's class's): it is rebuilt from that.
    base = type(self).__mro__[1]
    return _rebuild, (base.__module__, base.__qualname__, self.args), self.__dict__ or None


def _rebuild(module: str, qualname: str, args: tuple):
    return twin(getattr(importlib.import_module(module), qualname))(*args)
