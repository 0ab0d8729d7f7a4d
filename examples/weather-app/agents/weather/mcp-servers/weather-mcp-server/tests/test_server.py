from server import FORECASTS


def test_known_city():
    assert FORECASTS["seattle"] == "rain"
