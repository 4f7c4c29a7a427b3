"""Upcasters: functions that turn a stored payload of an older schema version into the next one.

Stored events are never rewritten. A row keeps the payload and `schema_version` it was written
with; `orders.domain.events.from_payload` runs the chain of upcasters from the row's version up to the
event type's current version each time the row is read. That one reader serves the write side's
rehydration and every projection alike (see docs/schema-versions.md).

An upcaster is registered under `(event_type, from_version)` and maps a payload of `from_version`
to a payload of `from_version + 1`. It must:

- be total: a stored row it cannot read stops the sync worker and makes its order unusable, so it
  maps every payload that version could hold (falling back to documented placeholders), and
  raises only for payloads that version could never have held;
- not modify its input (it returns a new dict);
- spell out the next version's payload literally, as plain JSON values, without the current event
  dataclasses: those move on with later versions, while the upcaster's output shape must not.

This module imports nothing from `orders.domain.events`, which imports it.

Version 1 -> 2 of OrderCreated and ShippingAddressChanged: in version 1, `shipping_address` was one
free-text line ("Ada Lovelace, Main St 1, 10115 Berlin, DE"); in version 2 it is a structured
object. Rows written before version 2 existed carry version 1 but already hold the object, so the
upcaster passes objects through unchanged and parses strings with `parse_address_line`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeAlias

Payload: TypeAlias = dict[str, Any]
Upcaster: TypeAlias = Callable[[Payload], Payload]

UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Registers the decorated function as the upcaster of `event_type` from `from_version` to the next."""

    def register(function: Upcaster) -> Upcaster:
        key = (event_type, from_version)
        if key in UPCASTERS:
            raise ValueError(f"{event_type} already has an upcaster from schema version {from_version}")
        UPCASTERS[key] = function
        return function

    return register


def upcast(event_type: str, payload: Payload, from_version: int, to_version: int) -> Payload:
    """`payload`, stored as `from_version` of `event_type`, brought to `to_version` one step at a time.

    Returns `payload` itself when the versions are equal; never modifies it.
    """
    for version in range(from_version, to_version):
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise ValueError(f"{event_type} has no upcaster from schema version {version} to {version + 1}")
        payload = step(payload)
    return payload


def missing_upcasters(current_versions: dict[str, int]) -> list[tuple[str, int]]:
    """The `(event_type, from_version)` steps that a chain from version 1 to the current one lacks."""
    return [
        (name, version)
        for name, current in current_versions.items()
        for version in range(1, current)
        if (name, version) not in UPCASTERS
    ]


# --- version 1 -> 2: the shipping address as one free-text line -------------------------------

# Parts of a free-text line are separated by commas and line breaks.
_SEPARATORS = re.compile(r"\r\n|[,\r\n]")
_COUNTRY_CODE = re.compile(r"[A-Za-z]{2}")
# A postal code is one token of ASCII letters, digits and '-' that holds at least one digit.
_POSTAL_CODE = re.compile(r"[A-Za-z0-9-]*[0-9][A-Za-z0-9-]*")
_POSTAL_CODE_MAX = 20  # the longest postal code a command may send (orders.domain.rules.check_address)
_POSTAL_FIRST = re.compile(r"(?P<postal_code>\S+)\s+(?P<city>.+)", re.DOTALL)
_POSTAL_LAST = re.compile(r"(?P<city>.+?)\s+(?P<postal_code>\S+)", re.DOTALL)
_MIN_PARTS = 4  # recipient, line1, "postal_code city", country_code

# What an address that could not be parsed holds besides its text (in line1).
UNKNOWN = "(unknown)"
UNKNOWN_COUNTRY = "ZZ"  # ISO 3166 user-assigned code, used for "unknown country" (as in Unicode CLDR)


def address_line_parts(text: str) -> list[str]:
    """The parts of a free-text address: split at commas and line breaks, trimmed, empty ones dropped."""
    return [part for part in (piece.strip() for piece in _SEPARATORS.split(text)) if part]


def _is_postal_code(token: str) -> bool:
    return len(token) <= _POSTAL_CODE_MAX and _POSTAL_CODE.fullmatch(token) is not None


def _postal_code_and_city(part: str) -> tuple[str, str] | None:
    """("10115", "Berlin") from "10115 Berlin" or "Berlin 10115"; the postal code first wins."""
    for pattern in (_POSTAL_FIRST, _POSTAL_LAST):
        match = pattern.fullmatch(part)
        if match is not None and _is_postal_code(match["postal_code"]):
            return match["postal_code"], match["city"]
    return None


def parse_address_line(text: str) -> Payload | None:
    """The structured (version 2) address in a free-text line, or None when the line does not follow
    the rule: at least four parts, `recipient, line1[, line2 ...], <postal code and city>, country`.

    - the last part is a country code of two ASCII letters, upper-cased ("de" -> "DE");
    - the part before it holds the postal code and the city: its first whitespace-separated token
      when that is a postal code ("10115 Berlin"), else its last token when that is ("London EC1A");
      a postal code is a token of ASCII letters, digits and '-', with a digit, at most 20 long;
    - the first part is the recipient, the second line1, and any parts between line1 and the postal
      code and city form line2, joined by ", "; region stays empty.
    """
    parts = address_line_parts(text)
    if len(parts) < _MIN_PARTS or _COUNTRY_CODE.fullmatch(parts[-1]) is None:
        return None
    locality = _postal_code_and_city(parts[-2])
    if locality is None:
        return None
    postal_code, city = locality
    return {
        "recipient": parts[0],
        "line1": parts[1],
        "city": city,
        "postal_code": postal_code,
        "country_code": parts[-1].upper(),
        "line2": ", ".join(parts[2:-2]),
        "region": "",
    }


def address_from_line(text: str) -> Payload:
    """The structured address of a free-text line: `parse_address_line`'s, or when the line does not
    parse, one whose line1 holds the whole text (its parts joined by ", ") and whose recipient,
    city and postal code are UNKNOWN and country code UNKNOWN_COUNTRY; line1 is UNKNOWN as well
    when the text is blank."""
    parsed = parse_address_line(text)
    if parsed is not None:
        return parsed
    return {
        "recipient": UNKNOWN,
        "line1": ", ".join(address_line_parts(text)) or UNKNOWN,
        "city": UNKNOWN,
        "postal_code": UNKNOWN,
        "country_code": UNKNOWN_COUNTRY,
        "line2": "",
        "region": "",
    }


def _address_v2(event_type: str, address: object, *, optional: bool) -> Payload | None:
    if isinstance(address, dict):  # written before version 2 existed, already structured
        return address
    if isinstance(address, str):
        if optional and not address.strip():
            return None
        return address_from_line(address)
    if address is None:
        return None if optional else address_from_line("")
    raise ValueError(
        f"{event_type} schema version 1: shipping_address must be a string, an object or null, "
        f"got {type(address).__name__}"
    )


@upcaster("OrderCreated", 1)
def order_created_v1_to_v2(payload: Payload) -> Payload:
    """A free-text address becomes structured; null, empty or blank text means no address."""
    address = _address_v2("OrderCreated", payload.get("shipping_address"), optional=True)
    return {**payload, "shipping_address": address}


@upcaster("ShippingAddressChanged", 1)
def shipping_address_changed_v1_to_v2(payload: Payload) -> Payload:
    """A free-text address becomes structured; null or blank text (which version 1 should never have
    held) becomes the all-placeholder address, so the order stays readable."""
    address = _address_v2("ShippingAddressChanged", payload.get("shipping_address"), optional=False)
    return {**payload, "shipping_address": address}
