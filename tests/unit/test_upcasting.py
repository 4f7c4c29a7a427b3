"""Schema versions and upcasters: each upcaster, the chain that from_payload runs, and the
version-1 free-text address rule (docs/schema-versions.md)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from orders.domain.events import (
    EVENT_TYPES,
    Address,
    Event,
    OrderCreated,
    ShippingAddressChanged,
    event_type,
    from_payload,
    to_payload,
)
from orders.domain.rules import CONTROL_PATTERN, COUNTRY_PATTERN, check_address
from orders.domain.upcasting import (
    UNKNOWN,
    UNKNOWN_COUNTRY,
    UPCASTERS,
    Payload,
    Upcaster,
    address_from_line,
    address_line_parts,
    missing_upcasters,
    order_created_v1_to_v2,
    parse_address_line,
    shipping_address_changed_v1_to_v2,
    upcast,
    upcaster,
)
from tests.unit.strategies import addresses, events

ADA = {
    "recipient": "Ada Lovelace",
    "line1": "Main St 1",
    "city": "Berlin",
    "postal_code": "10115",
    "country_code": "DE",
    "line2": "",
    "region": "",
}
STRUCTURED = {**ADA, "line2": "Apt 4", "region": "BE"}


def unknown(line1: str) -> Payload:
    """The address of a line that does not parse: the text in line1, placeholders elsewhere."""
    return {
        "recipient": UNKNOWN,
        "line1": line1,
        "city": UNKNOWN,
        "postal_code": UNKNOWN,
        "country_code": UNKNOWN_COUNTRY,
        "line2": "",
        "region": "",
    }


def address(payload: Payload) -> Address:
    return Address(**payload)


# --- current versions and the registry ---------------------------------------------------------


def test_current_schema_versions() -> None:
    """The two event types that carry a shipping address are at version 2; the others at 1."""
    expected = {
        "OrderCreated": 2,
        "ItemAdded": 1,
        "ItemRemoved": 1,
        "ShippingAddressChanged": 2,
        "OrderConfirmed": 1,
        "OrderShipped": 1,
        "OrderCancelled": 1,
    }

    assert expected == {name: cls.schema_version for name, cls in EVENT_TYPES.items()}


def test_every_older_version_has_an_upcaster_to_the_next() -> None:
    """From version 1 to each type's current version, every step is registered."""
    expected: list[tuple[str, int]] = []

    assert expected == missing_upcasters({name: cls.schema_version for name, cls in EVENT_TYPES.items()})


def test_registered_upcasters() -> None:
    """The registry holds exactly the version-1 address upcasters."""
    expected = {
        ("OrderCreated", 1): order_created_v1_to_v2,
        ("ShippingAddressChanged", 1): shipping_address_changed_v1_to_v2,
    }

    assert expected == UPCASTERS


def test_a_second_upcaster_for_the_same_step_is_refused() -> None:
    """Registering (type, version) twice raises instead of silently replacing the first."""
    with pytest.raises(ValueError, match="OrderCreated already has an upcaster from schema version 1"):
        upcaster("OrderCreated", 1)(order_created_v1_to_v2)


def test_missing_upcasters_names_each_missing_step() -> None:
    """A type at version 3 without upcasters lacks the steps from 1 and from 2."""
    expected = [("Teleported", 1), ("Teleported", 2)]

    assert expected == missing_upcasters({"Teleported": 3, "OrderCreated": 2})


# --- the chain -----------------------------------------------------------------------------------


def test_upcast_to_the_same_version_returns_the_payload_itself() -> None:
    """No step runs when the payload is already at the target version."""
    payload: Payload = {"shipping_address": "Ada Lovelace, Main St 1, 10115 Berlin, DE"}

    assert upcast("OrderCreated", payload, 2, 2) is payload


def test_upcast_runs_each_step_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload of version 1 of a type at version 4 goes through 1->2, 2->3 and 3->4, in that order."""

    def step(version: int) -> Upcaster:
        return lambda payload: {**payload, "steps": [*payload["steps"], version]}

    for version in (1, 2, 3):
        monkeypatch.setitem(UPCASTERS, ("Chained", version), step(version))

    expected = ({"steps": [1, 2, 3]}, {"steps": [2, 3]})

    assert expected == (upcast("Chained", {"steps": []}, 1, 4), upcast("Chained", {"steps": []}, 2, 4))


def test_upcast_without_a_step_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap in the chain raises ValueError naming the missing step."""
    monkeypatch.setitem(UPCASTERS, ("Gappy", 1), lambda payload: payload)

    with pytest.raises(ValueError, match="Gappy has no upcaster from schema version 2 to 3"):
        upcast("Gappy", {}, 1, 3)


@pytest.mark.parametrize(
    ("type_name", "version", "payload", "expected"),
    [
        pytest.param(
            "OrderCreated",
            1,
            {
                "customer_id": "c-1",
                "currency_code": "EUR",
                "shipping_address": "Ada Lovelace, Main St 1, 10115 Berlin, DE",
            },
            OrderCreated("c-1", "EUR", address(ADA)),
            id="OrderCreated-v1-text",
        ),
        pytest.param(
            "OrderCreated",
            1,
            {"customer_id": "c-1", "currency_code": "EUR", "shipping_address": STRUCTURED},
            OrderCreated("c-1", "EUR", address(STRUCTURED)),
            id="OrderCreated-v1-structured",
        ),
        pytest.param(
            "OrderCreated",
            1,
            {"customer_id": "c-1", "currency_code": "EUR", "shipping_address": None},
            OrderCreated("c-1", "EUR", None),
            id="OrderCreated-v1-null",
        ),
        pytest.param(
            "OrderCreated",
            1,
            {"customer_id": "c-1", "currency_code": "EUR", "shipping_address": ""},
            OrderCreated("c-1", "EUR", None),
            id="OrderCreated-v1-empty",
        ),
        pytest.param(
            "OrderCreated",
            2,
            {"customer_id": "c-1", "currency_code": "EUR", "shipping_address": STRUCTURED},
            OrderCreated("c-1", "EUR", address(STRUCTURED)),
            id="OrderCreated-v2",
        ),
        pytest.param(
            "ShippingAddressChanged",
            1,
            {"shipping_address": "Ada Lovelace, Main St 1, 10115 Berlin, DE"},
            ShippingAddressChanged(address(ADA)),
            id="ShippingAddressChanged-v1-text",
        ),
        pytest.param(
            "ShippingAddressChanged",
            1,
            {"shipping_address": STRUCTURED},
            ShippingAddressChanged(address(STRUCTURED)),
            id="ShippingAddressChanged-v1-structured",
        ),
        pytest.param(
            "ShippingAddressChanged",
            1,
            {"shipping_address": "behind the station"},
            ShippingAddressChanged(address(unknown("behind the station"))),
            id="ShippingAddressChanged-v1-unparsable",
        ),
        pytest.param(
            "ShippingAddressChanged",
            2,
            {"shipping_address": STRUCTURED},
            ShippingAddressChanged(address(STRUCTURED)),
            id="ShippingAddressChanged-v2",
        ),
    ],
)
def test_from_payload_reads_every_stored_version(
    type_name: str, version: int, payload: Payload, expected: Event
) -> None:
    """from_payload upcasts a stored payload of any known version to the current event."""
    stored = json.loads(json.dumps(payload))

    assert expected == from_payload(type_name, version, stored)
    assert payload == stored  # not modified


@pytest.mark.parametrize("type_name", ["OrderCreated", "ShippingAddressChanged"])
def test_a_version_newer_than_the_code_is_refused(type_name: str) -> None:
    """A row written by newer code raises ValueError naming the versions this code reads."""
    with pytest.raises(
        ValueError,
        match=rf"{type_name} schema version 3 is not supported: this code reads versions 1 to 2 \(written by newer",
    ):
        from_payload(type_name, 3, {"shipping_address": STRUCTURED})


# --- the version-1 -> 2 upcasters ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        pytest.param("Ada Lovelace, Main St 1, 10115 Berlin, DE", ADA, id="text"),
        pytest.param(STRUCTURED, STRUCTURED, id="structured"),
        pytest.param(None, None, id="null"),
        pytest.param("", None, id="empty"),
        pytest.param(" \n ", None, id="blank"),
        pytest.param("behind the station", unknown("behind the station"), id="unparsable"),
    ],
)
def test_order_created_v1_to_v2(stored: object, expected: Payload | None) -> None:
    """OrderCreated: text is parsed, an object passes through, null/empty/blank means no address;
    the other fields are kept and the input is not modified."""
    payload = {"customer_id": "c-1", "currency_code": "EUR", "shipping_address": stored}
    before = copy.deepcopy(payload)

    upcast_payload = order_created_v1_to_v2(payload)

    assert {"customer_id": "c-1", "currency_code": "EUR", "shipping_address": expected} == upcast_payload
    assert before == payload


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        pytest.param("Ada Lovelace, Main St 1, 10115 Berlin, DE", ADA, id="text"),
        pytest.param(STRUCTURED, STRUCTURED, id="structured"),
        pytest.param(None, unknown(UNKNOWN), id="null"),
        pytest.param("", unknown(UNKNOWN), id="empty"),
        pytest.param("behind the station", unknown("behind the station"), id="unparsable"),
    ],
)
def test_shipping_address_changed_v1_to_v2(stored: object, expected: Payload) -> None:
    """ShippingAddressChanged: text is parsed, an object passes through, and null or blank (never
    valid) becomes the all-placeholder address rather than an unreadable order."""
    payload = {"shipping_address": stored}
    before = copy.deepcopy(payload)

    assert {"shipping_address": expected} == shipping_address_changed_v1_to_v2(payload)
    assert before == payload


def test_a_structured_address_passes_through_as_the_same_object() -> None:
    """Rows written before version 2 existed already hold the object: it is used as it is."""
    structured = dict(STRUCTURED)

    upcast_payload = shipping_address_changed_v1_to_v2({"shipping_address": structured})

    assert upcast_payload["shipping_address"] is structured


@pytest.mark.parametrize("stored", [42, ["Ada", "Berlin"], True])
@pytest.mark.parametrize("upcaster_function", [order_created_v1_to_v2, shipping_address_changed_v1_to_v2])
def test_an_address_of_another_json_type_is_refused(stored: object, upcaster_function: Any) -> None:
    """Version 1 never held a number, list or boolean address: ValueError names what it got."""
    with pytest.raises(ValueError, match="shipping_address must be a string, an object or null, got"):
        upcaster_function({"shipping_address": stored})


# --- the free-text rule --------------------------------------------------------------------------


def structured(
    recipient: str, line1: str, postal_code: str, city: str, country_code: str, *, line2: str = ""
) -> Payload:
    return {
        "recipient": recipient,
        "line1": line1,
        "city": city,
        "postal_code": postal_code,
        "country_code": country_code,
        "line2": line2,
        "region": "",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Ada Lovelace, Main St 1, 10115 Berlin, DE", ADA, id="basic"),
        pytest.param("  Ada Lovelace ,Main St 1,10115   Berlin ,  DE  ", ADA, id="spaces-trimmed"),
        pytest.param("Ada Lovelace, Main St 1, 10115 Berlin, de", ADA, id="country-upper-cased"),
        pytest.param("Ada Lovelace\nMain St 1\r\n10115 Berlin\rDE", ADA, id="line-breaks-separate"),
        pytest.param("Ada Lovelace,, Main St 1, , 10115 Berlin, DE,", ADA, id="empty-parts-dropped"),
        pytest.param(
            "Grace Hopper, Rue de Rivoli 1, Bâtiment B, 3e étage, 75001 Paris, FR",
            structured("Grace Hopper", "Rue de Rivoli 1", "75001", "Paris", "FR", line2="Bâtiment B, 3e étage"),
            id="line2-from-the-middle-parts",
        ),
        pytest.param(
            "Tim B, 1 High St, London EC1A, GB",
            structured("Tim B", "1 High St", "EC1A", "London", "GB"),
            id="postal-code-last",
        ),
        pytest.param(
            "Tim B, 1 High St, Berlin-Mitte 10115, DE",
            structured("Tim B", "1 High St", "10115", "Berlin-Mitte", "DE"),
            id="postal-code-last-digits",
        ),
        pytest.param(
            "Ada, Main St 1, 1012 AB Amsterdam, NL",
            structured("Ada", "Main St 1", "1012", "AB Amsterdam", "NL"),
            id="postal-code-first-wins",
        ),
        pytest.param(
            "Ada, Main St 1, D-10115 Berlin, DE",
            structured("Ada", "Main St 1", "D-10115", "Berlin", "DE"),
            id="postal-code-with-hyphen",
        ),
        pytest.param("Ada Lovelace, Main St 1, 10115 Berlin, Germany", None, id="country-not-a-code"),
        pytest.param("Ada Lovelace, Main St 1, Berlin, DE", None, id="no-postal-code"),
        pytest.param("Ada Lovelace, Main St 1, 10115, DE", None, id="no-city"),
        pytest.param("Main St 1, 10115 Berlin, DE", None, id="three-parts"),
        pytest.param("behind the station", None, id="one-part"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_address_line(text: str, expected: Payload | None) -> None:
    """The rule of docs/schema-versions.md, case by case."""
    assert expected == parse_address_line(text)


@pytest.mark.parametrize(
    ("text", "line1"),
    [
        pytest.param("behind the station", "behind the station", id="kept-whole"),
        pytest.param(
            "Ada Lovelace\nMain St 1, Berlin, Germany", "Ada Lovelace, Main St 1, Berlin, Germany", id="joined"
        ),
        pytest.param("  ", UNKNOWN, id="blank"),
    ],
)
def test_a_line_that_does_not_parse_is_kept_in_line1(text: str, line1: str) -> None:
    """The whole text (its parts joined by ", ") goes to line1; the rest are placeholders."""
    assert unknown(line1) == address_from_line(text)


# --- properties ----------------------------------------------------------------------------------

SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc", "Zs", "Zl", "Zp"], blacklist_characters=","),
    min_size=1,
    max_size=12,
)
POSTAL_CODES = st.from_regex(r"[A-Z]{0,2}[0-9]{1,6}", fullmatch=True)


def free_text_lines() -> st.SearchStrategy[str]:
    """Arbitrary text, and text built like an address line, so that both outcomes are common."""
    part = st.text(max_size=15)
    locality = st.tuples(POSTAL_CODES, st.text(max_size=10)).map(" ".join)
    built = st.tuples(
        st.lists(part, min_size=0, max_size=5),
        locality,
        st.sampled_from(["DE", "fr", "Germany", ""]),
        st.sampled_from([", ", ",", "\n", "\r\n", " , "]),
    ).map(lambda t: t[3].join([*t[0], t[1], t[2]]))
    return st.one_of(st.text(), built)


def squashed(values: list[str]) -> list[str]:
    """The characters of `values` without whitespace and commas, case-folded, in sorted order."""
    return sorted(c.casefold() for value in values for c in "".join(value.split()) if c != ",")


@given(events())
def test_a_current_payload_round_trips(event: Event) -> None:
    """Any event survives to_payload, JSON and from_payload of its type's current version."""
    stored = json.loads(json.dumps(to_payload(event)))

    assert event == from_payload(event_type(event), type(event).schema_version, stored)


@given(events().filter(lambda event: isinstance(event, OrderCreated | ShippingAddressChanged)))
def test_a_version_2_address_payload_reads_the_same_under_version_1(event: Event) -> None:
    """Rows stored as version 1 before version 2 existed already held the object: they read alike."""
    stored = json.loads(json.dumps(to_payload(event)))

    assert from_payload(event_type(event), 2, stored) == from_payload(event_type(event), 1, stored)


@given(addresses(), st.sampled_from([", ", "\n", " ,  "]))
def test_a_line_formatted_by_the_rule_parses_back(address: Address, separator: str) -> None:
    """An address written as `recipient, line1[, line2], postal_code city, country_code` parses back."""
    postal_and_city = f"{address.postal_code} {address.city}"
    parts = [address.recipient, address.line1, address.line2, postal_and_city, address.country_code]
    text = separator.join(part for part in parts if part)

    assert Address(**{**vars(address), "region": ""}) == Address(**address_from_line(text))


@given(SAFE_TEXT, SAFE_TEXT, st.lists(SAFE_TEXT, max_size=2), POSTAL_CODES, SAFE_TEXT)
def test_generated_address_lines_parse_into_their_parts(
    recipient: str, line1: str, line2: list[str], postal_code: str, city: str
) -> None:
    """Parts free of separators go to the fields they stand for."""
    text = ", ".join([recipient, line1, *line2, f"{postal_code} {city}", "NL"])

    assert structured(recipient, line1, postal_code, city, "NL", line2=", ".join(line2)) == parse_address_line(text)


@given(free_text_lines())
@example("Ada Lovelace, Main St 1, 10115 Berlin, DE")
@example("x" * 101)
@example("Ada\tLovelace, Main St 1, 10115 Berlin, DE")
def test_any_free_text_line_upcasts_to_a_complete_address(text: str) -> None:
    """Whatever the text, the upcast address:

    - has a recipient, line1, city and postal code, and a two-letter upper-case country code
      (what the read side shows and ShipOrder needs);
    - loses none of the text's characters but whitespace and commas (country codes are upper-cased),
      and adds only placeholders;
    - passes orders.domain.rules.check_address when the text has no control characters other than line
      breaks and is at most 100 characters long. (Otherwise it keeps them verbatim: it may hold a
      control character or be longer than a command may send; documented in docs/schema-versions.md.)
    """
    upcast_address = Address(**address_from_line(text))
    parsed = parse_address_line(text)

    fields = vars(upcast_address)
    assert all(isinstance(value, str) for value in fields.values())
    assert all(fields[name] for name in ("recipient", "line1", "city", "postal_code"))
    assert COUNTRY_PATTERN.fullmatch(upcast_address.country_code)
    kept = list(fields.values()) if parsed is not None else [upcast_address.line1]  # the rest are placeholders
    if not address_line_parts(text):  # blank text: line1 is a placeholder as well
        kept = []
    assert squashed([text]) == squashed(kept)
    clean = CONTROL_PATTERN.search(text.replace("\r", "").replace("\n", "")) is None
    if clean and len(text) <= 100:
        assert not check_address("shipping_address", upcast_address)
