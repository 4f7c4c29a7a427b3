"""from_payload on rows it cannot read: each failure is a ValueError or TypeError, the errors the
event store's read turns into a PoisonEvent (orders.store.event_store._decoded), never another."""

from __future__ import annotations

from typing import Any

import pytest

from orders.domain.events import from_payload


@pytest.mark.parametrize("payload", [[1, 2], "text", None, 7], ids=["list", "string", "null", "number"])
def test_a_payload_that_is_not_an_object_is_a_type_error(payload: Any) -> None:
    """A row's JSON that is not an object cannot be an event, at the current schema version or an older one."""
    for version in (1, 2):
        with pytest.raises(TypeError, match="not an object"):
            from_payload("OrderCreated", version, payload)


def test_a_payload_with_fields_the_event_lacks_is_a_type_error() -> None:
    """Fields the event type does not have fail its construction."""
    with pytest.raises(TypeError):
        from_payload("ItemRemoved", 1, {"sku": "A", "colour": "red"})
