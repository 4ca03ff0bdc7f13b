"""The one shape of mmjax's resumable loaders: an outer iterator that owns an inner grain iterator, built lazily
from the outer's position (`_start()`), stopped when the position is reset and when the outer closes."""

from __future__ import annotations

import grain.python as grain


class InnerIteratorOwner(grain.DatasetIterator):
    """Base of `pipeline.TrainIterator` and `stream.StreamIterator`: subclasses set `self._inner = None` and define
    `_start()`, which builds (or returns) the inner iterator at the current position."""

    def start_prefetch(self) -> None:
        self._assert_not_closed()
        self._start().start_prefetch()

    def close(self) -> None:
        if not self._closed:
            self._stop_inner()
        super().close()

    def _stop_inner(self) -> None:
        if self._inner is not None:
            inner, self._inner = self._inner, None
            inner.close()
