"""Signatures and workflows: Celery's canvas (``signature``, ``chain``, ``group``, ``chord``, ``map``...).

A :class:`Signature` is plain data, a dict as in Celery (``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``, ``chord_size``), so it travels inside messages and is rebuilt by the
worker with :func:`signature`. Sending a workflow sends only the tasks that can start; the rest travels
in their messages under Celery's protocol v2 names, and the worker that finishes a step sends the next:

- a **chain** sends its first step with ``chain`` = the other steps, last first; the worker that
  finishes a step pops the next one and sends it with the result as first argument (not for ``si``);
- a **group** sends each member with the group's id and the member's index;
- a **chord** sends its header as a group whose members carry the callback (``chord``, holding
  ``chord_size``); the result backend counts the header's results, and the worker whose task
  completes the count sends the callback with the results, in header order;
- ``link`` and ``link_error`` go in ``callbacks`` and ``errbacks``; on a workflow they are placed as
  Celery 5.7 places them: a chain's ``link`` on its last step and its ``link_error`` on every step; a
  chord's both on its callback (not on the header tasks: a failed header task fails the callback with
  ``ChordError``, and that calls the callback's errbacks).

Every task id is chosen when the workflow is sent ("frozen"), so the client's result handles exist at
once: a chain's result is its last step's, with ``parent`` the step before; a chord's is its
callback's, with ``parent`` the header's :class:`~aqueue.result.groupresult.GroupResult`.

A chain followed by a group is sent as a chord (``chain(group(...), cb)`` is ``chord(group(...), cb)``,
as in Celery); a group in a chord header is flattened into the header.

Modules: :mod:`~aqueue.canvas.signatures` (``Signature``, ``signature``, the one way any signature is
sent), :mod:`~aqueue.canvas.workflows` (``chain``, ``group``, ``chord``), :mod:`~aqueue.canvas.mapping`
(``map``, ``starmap``, ``chunks`` and the builtin tasks behind them). Import from ``aqueue.canvas``.
"""

from __future__ import annotations

from aqueue.canvas.mapping import chunks, register_builtins, xmap, xstarmap
from aqueue.canvas.signatures import Signature, apply_signature, signature
from aqueue.canvas.workflows import chain, chord, group

__all__ = [
    "Signature",
    "apply_signature",
    "register_builtins",
    "chain",
    "chord",
    "chunks",
    "group",
    "signature",
    "xmap",
    "xstarmap",
]
