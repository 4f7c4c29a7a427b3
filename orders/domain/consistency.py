"""Positions in the event log that are safe to compare, and their token form.

Events become visible in commit order, not in `position` order, so the log is
read in (tx_id, position) order (see orders.store.event_store). A projection's
checkpoint and a command's consistency token are therefore both that pair;
comparing positions alone would be wrong.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_TOKEN = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


class LogPosition(NamedTuple):
    """A point in the log in read order; tuples compare field by field, as needed."""

    tx_id: int
    position: int

    def token(self) -> str:
        return f"{self.tx_id}-{self.position}"

    @classmethod
    def parse(cls, token: str | bytes) -> LogPosition:
        """Inverse of `token`; raises ValueError for anything else."""
        if isinstance(token, bytes):
            token = token.decode()
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(f"not a consistency token: {token!r}")
        return cls(int(match[1]), int(match[2]))


START = LogPosition(0, 0)
