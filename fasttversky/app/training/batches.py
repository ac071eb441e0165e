"""The micro-batches of a training run, numbered over the whole run so that a resumed
run reads exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

__all__ = ["BatchStream"]


class BatchStream:
    """Micro-batches numbered 0, 1, 2, ... from a callable ``fn(i)`` or an iterable.

    An iterable is iterated again from the start when exhausted (epochs), and on resume
    it is re-iterated and the first ``consumed`` micro-batches are skipped, which is
    exact for deterministic iterables (the RNG states are restored afterwards).
    """

    def __init__(self, batches, consumed: int):
        self.index = consumed
        self._fn: Callable | None = None
        self._src: Iterable | None = None
        self._it: Iterator | None = None
        if callable(batches) and not hasattr(batches, "__iter__"):
            self._fn = batches
            return
        if not hasattr(batches, "__iter__"):
            raise TypeError("batches must be an iterable or a callable batch(i) -> (image, label)")
        self._src = batches
        self._it = iter(batches)
        for _ in range(consumed):
            self._next_from_iterable()

    def _next_from_iterable(self):
        try:
            return next(self._it)
        except StopIteration:
            if self._it is self._src:  # a one-shot iterator cannot be restarted
                raise RuntimeError(
                    "batches ran out; pass a re-iterable (list, Dataset) or a callable "
                    "batch(i) for more steps than the iterator yields"
                ) from None
            self._it = iter(self._src)
            try:
                return next(self._it)
            except StopIteration:
                raise RuntimeError("batches is empty") from None

    def next(self):
        batch = self._fn(self.index) if self._fn is not None else self._next_from_iterable()
        self.index += 1
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("each batch must be a pair (image, label)")
        return batch
