"""``Closing``: the ``with`` protocol of every object that holds workers (``with`` closes it)."""

from __future__ import annotations

from typing import TypeVar

_Self = TypeVar("_Self", bound="Closing")


class Closing:
    """``with obj:`` returns ``obj`` and calls ``obj.close()`` at the block's end, however it ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
