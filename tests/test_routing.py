"""Routing: explicit queue > task_routes > the task's own queue > task_default_queue."""

from __future__ import annotations

from typing import Any

import pytest

from aqueue.exceptions import ImproperlyConfigured
from aqueue.routing import Router


def test_no_routes_use_the_task_queue_then_the_default() -> None:
    router = Router(None, "celery")
    assert router.queue_for("tasks.add") == "celery"
    assert router.queue_for("tasks.add", "own") == "own"
    assert not router.dynamic


def test_a_mapping_routes_by_name_over_the_task_queue() -> None:
    router = Router({"tasks.add": "low-priority", "tasks.mul": {"queue": "math"}}, "celery")
    assert router.queue_for("tasks.add", "own") == "low-priority"
    assert router.queue_for("tasks.mul") == "math"
    assert router.queue_for("tasks.other") == "celery"


def test_glob_patterns_match_names() -> None:
    router = Router({"tasks.feed.*": "feeds", "*": "catch-all"}, "celery")
    assert router.queue_for("tasks.feed.fetch") == "feeds"
    assert router.queue_for("tasks.add") == "catch-all"


def test_an_exact_name_wins_over_a_pattern() -> None:
    assert Router({"tasks.*": "glob", "tasks.add": "exact"}, "celery").queue_for("tasks.add") == "exact"


def test_a_router_function_sees_name_args_and_kwargs_and_is_not_cached() -> None:
    # Given a function route that picks a queue from the arguments
    calls: list[tuple[Any, ...]] = []

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any) -> str | None:
        calls.append((name, tuple(args), kwargs))
        return "big" if args and args[0] > 100 else None

    router = Router(route, "celery")
    # Then each call is routed on its own arguments
    assert router.dynamic
    assert router.queue_for("tasks.add", None, (500,), {"k": 1}) == "big"
    assert router.queue_for("tasks.add", None, (5,), {}) == "celery"
    assert calls == [("tasks.add", (500,), {"k": 1}), ("tasks.add", (5,), {})]


def test_a_list_of_tables_is_tried_in_order() -> None:
    def nothing(*args: Any) -> None:
        return None

    router = Router([nothing, {"tasks.add": "first"}, {"tasks.add": "second", "tasks.mul": "m"}], "celery")
    assert (router.queue_for("tasks.add"), router.queue_for("tasks.mul")) == ("first", "m")


def test_static_answers_are_cached() -> None:
    routes = {"tasks.add": "low"}
    router = Router(routes, "celery")
    assert router.queue_for("tasks.add") == "low"
    routes["tasks.add"] = "changed"
    assert router.queue_for("tasks.add") == "low"


@pytest.mark.parametrize("routes", ["low-priority", 42])
def test_routes_of_the_wrong_type_are_refused(routes: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="task_routes must be"):
        Router(routes, "celery")


@pytest.mark.parametrize("route", [{"exchange": "x"}, 7])
def test_a_route_without_a_queue_is_refused(route: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="queue name"):
        Router({"tasks.add": route}, "celery").queue_for("tasks.add")
