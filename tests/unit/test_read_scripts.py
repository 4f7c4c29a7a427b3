"""The read service's Lua scripts touch only the keys they declare (Redis Cluster routes a script by
its KEYS, and issue 15 asks that every key a script touches be declared)."""

from __future__ import annotations

import re

import pytest

from orders.store.views import _READ_LIVE, GENERATION_MOVED, GENERATION_PREFIX_LUA, moved_to
from read_service.servicer import _PAGE_SCRIPT

CALL = re.compile(r"redis\.call\('(\w+)',\s*([^,)]+)")


@pytest.mark.parametrize("script", [_READ_LIVE, _PAGE_SCRIPT], ids=["read-live", "page"])
def test_every_key_a_read_script_touches_is_one_of_its_keys(script: str) -> None:
    calls = CALL.findall(script)
    assert calls
    assert all(re.fullmatch(r"KEYS\[\w+\]", key.strip()) for _, key in calls), calls
    assert script.startswith(GENERATION_PREFIX_LUA)  # and every one checks the guessed generation first


def test_the_generation_moved_marker_is_told_from_a_reply() -> None:
    assert moved_to(f"{GENERATION_MOVED}3") == 3
    assert moved_to(f"{GENERATION_MOVED}0".encode()) == 0
    assert moved_to([b"1-1", None]) is None
    assert moved_to(["generation moved: ", "x"]) is None
