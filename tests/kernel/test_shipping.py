"""Shipping functions, values and exceptions (kernel/shipping.py)."""

from __future__ import annotations

import pickle
import threading

import pytest

from kernel import ShippingError, function_key, shipping
from tests.astra import tasks


def test_importable_functions_ship_by_reference():
    key, data = function_key(tasks.square)
    assert len(data) < 100  # module and name, not code
    assert shipping.load_function(data) is tasks.square
    assert function_key(tasks.square) == (key, data)  # the key is the content hash
    assert function_key(tasks.add)[0] != key


def test_closures_and_lambdas_ship_by_value():
    n = 3

    def local(x):
        return x + n

    key, data = function_key(local)
    assert shipping.load_function(data)(1) == 4
    assert shipping.load_function(function_key(lambda: 7)[1])() == 7
    m = 4

    def other(x):
        return x + m

    assert function_key(other)[0] != key


def test_unpicklable_values_raise_shipping_error():
    with pytest.raises(ShippingError):
        shipping.dumps(threading.Lock())
    with pytest.raises(ShippingError):
        shipping.loads(b"not a pickle")
    with pytest.raises(ShippingError, match="not callable"):
        shipping.load_function(pickle.dumps(42))


def test_values_fall_back_to_cloudpickle():
    assert shipping.loads(shipping.dumps([lambda: 5]))[0]() == 5


def test_exceptions_travel_with_their_traceback():
    try:
        tasks.boom("x")
    except ValueError as exc:
        data, tb, text = shipping.pack_exception(exc)
    assert isinstance(pickle.loads(data), ValueError)
    assert "in boom" in tb
    assert text == "ValueError: x"


def test_an_exception_that_will_not_rebuild_travels_as_text():
    try:
        tasks.raise_unpicklable()
    except tasks.Unpicklable as exc:
        data, tb, text = shipping.pack_exception(exc)
    assert data == b""
    assert "Unpicklable" in text
    assert "raise_unpicklable" in tb
