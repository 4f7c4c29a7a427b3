"""Currency codes: ISO 4217's list (pycountry), less the codes that are no money (orders.domain.rules)."""

from __future__ import annotations

import pycountry
import pytest

from orders.domain.commands import AddItem, CommandEnvelope, CreateOrder
from orders.domain.errors import InvalidCommand
from orders.domain.rules import CURRENCY_CODES, NOT_MONEY, validate


def currency_violations(currency_code: str) -> dict[str, str]:
    """The violations of a CreateOrder and an AddItem in `currency_code`, field path -> description."""
    found: dict[str, str] = {}
    for command in (
        CreateOrder("order-1", "cust-1", currency_code),
        AddItem("order-1", "SKU-1", "W", 1, 5, currency_code),
    ):
        try:
            validate(CommandEnvelope(command))
        except InvalidCommand as error:
            found |= {violation.field: violation.description for violation in error.violations}
    return found


@pytest.mark.parametrize(
    "code",
    ["EUR", "USD", "JPY", "KWD", "CHF", "GBP", "XAF", "XOF", "XPF", "XCD", "CLF", "SLE"],
)
def test_iso_4217_currencies_are_accepted(code: str) -> None:
    """Currencies of ISO 4217's current list pass, with 0, 2, 3 or 4 decimals, and the X-coded ones in circulation."""
    assert currency_violations(code) == {}


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("ZZZ", id="not-assigned"),
        pytest.param("ABC", id="not-assigned-2"),
        pytest.param("DEM", id="withdrawn-mark"),
        pytest.param("HRK", id="withdrawn-kuna"),
        pytest.param("eur", id="lower-case"),
        pytest.param("Eur", id="mixed-case"),
        pytest.param("EU", id="short"),
        pytest.param("EURO", id="long"),
        pytest.param("", id="empty"),
        pytest.param(" EUR", id="space"),
        pytest.param("ＥＵＲ", id="full-width"),
    ],
)
def test_codes_not_in_iso_4217_are_refused_naming_the_field(code: str) -> None:
    """A code that is not a current ISO 4217 code is a violation of each command's own field path."""
    violations = currency_violations(code)

    assert sorted(violations) == ["currency_code", "unit_price.currency_code"]
    assert all("must be an ISO 4217 currency code in upper case" in text for text in violations.values())


@pytest.mark.parametrize("code", sorted(NOT_MONEY))
def test_iso_4217_codes_that_are_no_money_are_refused(code: str) -> None:
    """No currency (XXX), testing (XTS), precious metals and units of account are not an order's currency."""
    violations = currency_violations(code)

    assert sorted(violations) == ["currency_code", "unit_price.currency_code"]
    assert all(text.startswith(f"must be a currency: {code!r}") for text in violations.values())


def test_the_refused_codes_are_iso_4217_codes() -> None:
    """Each code refused as no money is one that ISO 4217 assigns (a typo would refuse nothing)."""
    assigned = {currency.alpha_3 for currency in pycountry.currencies}

    assert set() == NOT_MONEY - assigned
    assert {"XXX", "XTS"} <= NOT_MONEY


def test_the_accepted_codes_are_the_whole_list() -> None:
    """The accepted codes are ISO 4217's list as pycountry ships it, not a hand-typed subset."""
    assigned = {currency.alpha_3 for currency in pycountry.currencies}

    assert assigned - NOT_MONEY == CURRENCY_CODES
    assert len(CURRENCY_CODES) > 150
