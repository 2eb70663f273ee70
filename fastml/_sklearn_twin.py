"""fastml's errors and warnings as scikit-learn's too, where scikit-learn is installed.

fastml's estimators raise their own NotFittedError and warn their own DataConversionWarning
(scikit-learn is optional). scikit-learn's tools and check_estimator catch and filter by their own
classes, so what fastml raises is, where scikit-learn is installed, an instance of a subclass of
both: ``twin(NotFittedError)(message)``. scikit-learn is imported on that path only: it takes
about a second to import.
"""

from __future__ import annotations

import importlib

_TWINS: dict[type, type] = {}


def twin(cls: type) -> type:
    """``cls``, or where scikit-learn is installed a subclass of it that is also scikit-learn's
    class of the same name (in sklearn.exceptions)."""
    if cls not in _TWINS:
        try:
            from sklearn import exceptions
        except ImportError:
            _TWINS[cls] = cls
        else:
            _TWINS[cls] = type(cls.__name__, (cls, getattr(exceptions, cls.__name__)),
                               {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                                "__reduce__": _reduce})
    return _TWINS[cls]


def _reduce(self):
    # pickle cannot find the twin by its name (which is fastml's class's): it is rebuilt from that.
    base = type(self).__mro__[1]
    return _rebuild, (base.__module__, base.__qualname__, self.args), self.__dict__ or None


def _rebuild(module: str, qualname: str, args: tuple):
    return twin(getattr(importlib.import_module(module), qualname))(*args)
