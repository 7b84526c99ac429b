"""The public surface, pinned: the package's names, and an honest ``__all__`` in every public module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import aqueue
from aqueue import exceptions


def public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(aqueue.__path__, "aqueue."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def test_the_package_exports_exactly_these_names() -> None:
    assert sorted(aqueue.__all__) == [
        "App",
        "AsyncResult",
        "Celery",
        "Task",
        "__version__",
        "chain",
        "chord",
        "group",
        "signature",
        "states",
    ]
    assert aqueue.Celery is aqueue.App
    assert isinstance(aqueue.__version__, str) and aqueue.__version__.count(".") >= 2


def test_every_public_module_is_listed() -> None:
    # A guard against the walk below silently finding nothing
    assert {"aqueue.app", "aqueue.exceptions", "aqueue.worker.worker", "aqueue.result.base"} <= set(
        public_modules()
    )


@pytest.mark.parametrize("name", public_modules())
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        # Only a package with nothing of its own to export may go without __all__
        assert _own_public_names(module) == [], f"{name} has public names but no __all__"
        return
    assert len(set(exported)) == len(exported), f"duplicates in {name}.__all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what it does not define"


def _own_public_names(module: ModuleType) -> list[str]:
    return [
        n
        for n, value in vars(module).items()
        if not n.startswith("_") and not inspect.ismodule(value) and n != "annotations"
    ]


def test_every_exception_is_exported_and_drawn_in_the_tree() -> None:
    # Given every exception class defined in aqueue.exceptions
    defined = {
        name
        for name, value in vars(exceptions).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == exceptions.__name__
    }
    # Then each is exported, derives from AqueueError, and appears in the module's tree
    assert defined == set(exceptions.__all__)
    doc = exceptions.__doc__ or ""
    for name in defined:
        assert issubclass(getattr(exceptions, name), exceptions.AqueueError)
        assert name in doc, f"{name} is missing from the tree in the docstring"


def test_celerys_exception_names_are_kept() -> None:
    for name in (
        "Retry",
        "Ignore",
        "Reject",
        "NotRegistered",
        "MaxRetriesExceededError",
        "TimeLimitExceeded",
    ):
        assert name in exceptions.__all__
    assert issubclass(exceptions.TimeoutError, TimeoutError)
