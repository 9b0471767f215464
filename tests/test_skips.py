"""A missing asset skips a test on a developer's machine but fails it in CI (conftest.require)."""
import pytest

from conftest import require


def test_missing_asset_skips_locally_and_fails_in_ci(monkeypatch):
    require(True, "present: nothing happens")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the data is missing"):
        require(False, "the data is missing")
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI=true but the data is missing"):
            require(False, "the data is missing")
