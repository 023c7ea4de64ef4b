"""Counting host-device synchronisations on the CPU, for the tests that assert there are none.

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``, ...) waits for every queued kernel. On the CPU nothing waits, so the
tests count the *calls*: :func:`count_host_syncs` patches the converting ``Tensor`` methods and
attributes each call to a frame of the caller's stack.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
from torch import Tensor

#: ``Tensor`` methods that move a tensor's value to the host. ``__index__``/``__int__`` are
#: included: a shape is a Python int and never reaches them, only a tensor does.
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

PACKAGE = "lightning_gradwatch"


def in_package(frame: FrameType) -> bool:
    """Whether ``frame`` runs this package's code."""
    return frame.f_globals.get("__name__", "").startswith(PACKAGE)


def in_files(*suffixes: str) -> Callable[[FrameType], bool]:
    """A predicate: ``frame`` runs code from a file whose path ends with one of ``suffixes``
    (or contains a ``/<suffix>/`` folder)."""

    def matches(frame: FrameType) -> bool:
        path = frame.f_code.co_filename.replace("\\", "/")
        return in_package(frame) and any(path.endswith(s) or f"/{s}/" in path for s in suffixes)

    return matches


def _is_torch(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__", "")
    return module == __name__ or module == "torch" or module.startswith("torch.")


@contextmanager
def count_host_syncs(
    counts: Callable[[FrameType], bool] = in_package,
    *,
    whole_stack: bool = False,
    enabled: Callable[[], bool] = lambda: True,
) -> Iterator[Counter[str]]:
    """Patch :data:`SYNCING` on ``torch.Tensor``; yield a counter of ``"file:line method"``.

    Args:
        counts: which frame a call is attributed to.
        whole_stack: attribute a call to the innermost frame anywhere on the stack for which
            ``counts`` holds (e.g. a callback calling a library that synchronises); otherwise
            only to the innermost frame outside ``torch``.
        enabled: calls are counted only while this returns True (e.g. on non-logging steps).
    """
    found: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def attribute(frame: FrameType | None) -> FrameType | None:
        while frame is not None:
            if not _is_torch(frame):
                if counts(frame):
                    return frame
                if not whole_stack:
                    return None
            frame = frame.f_back
        return None

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if enabled():
                frame = attribute(sys._getframe(1))
                if frame is not None:
                    where = frame.f_code.co_filename.replace("\\", "/").split(PACKAGE, 1)[-1]
                    found[f"{PACKAGE}{where}:{frame.f_lineno} {name}"] += 1
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
