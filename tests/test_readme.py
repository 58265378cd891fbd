"""The README's tour runs as written (with a stub payment API)."""
import pathlib
import re

import pytest

import buttress

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class StubPayments:
    def __init__(self):
        self.keys = []

    def charge(self, order_id, amount, idempotency_key):
        self.keys.append(idempotency_key)
        return "charged"

    def refund(self, order_id):
        return "refunded"


def tour_code():
    text = README.read_text()
    section = text.split("## A short tour", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_tour_runs(capsys):
    if not README.exists():
        pytest.skip("README not shipped with this install")
    payments = StubPayments()
    namespace = {"payment_api": payments, "client_ip": "203.0.113.7"}
    exec(compile(tour_code(), "README.md", "exec"), namespace)
    assert payments.keys and isinstance(payments.keys[0], str)
    assert isinstance(namespace["cb"], buttress.CircuitBreaker)


def test_readme_names_the_two_commands():
    if not README.exists():
        pytest.skip("README not shipped with this install")
    text = README.read_text()
    assert 'python -m pip install -e . && python -m buttress demo' in text
    assert 'python -m pip install -e ".[test]" && python -m pytest' in text
