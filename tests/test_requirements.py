"""Too-old optional dependencies are refused in one line naming the package and the version needed."""

from __future__ import annotations

from importlib import metadata

import pytest
from typer.testing import CliRunner

from kdcache.cache.errors import ConfigError
from kdcache.cache.requirements import check_min_version
from kdcache.cache.storage.location import resolve_location
from kdcache.cli.app import app


def _pretend_installed(monkeypatch, package: str, version: str) -> None:
    real = metadata.version

    def fake_version(name: str) -> str:
        return version if name == package else real(name)

    monkeypatch.setattr(metadata, "version", fake_version)


def test_an_old_version_is_refused_naming_package_version_and_extra(monkeypatch):
    _pretend_installed(monkeypatch, "s3fs", "0.4.2")
    with pytest.raises(ConfigError, match=r"s3fs >= 2024\.6, found 0\.4\.2: .*kdcache\[s3\]"):
        check_min_version("s3fs", "2024.6", extra="s3")


def test_a_new_enough_version_passes_and_pep440_orders_versions(monkeypatch):
    _pretend_installed(monkeypatch, "s3fs", "2024.10.0")
    check_min_version("s3fs", "2024.6", extra="s3")  # 2024.10 > 2024.6 (not a string compare)
    _pretend_installed(monkeypatch, "s3fs", "2024.6.0")
    check_min_version("s3fs", "2024.6")


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(ConfigError, match=r"no-such-package-kd >= 1\.0, which is not installed"):
        check_min_version("no-such-package-kd", "1.0")


def test_an_s3_url_with_an_old_s3fs_is_refused_before_any_io(monkeypatch):
    _pretend_installed(monkeypatch, "s3fs", "0.4.2")
    with pytest.raises(ConfigError, match=r"s3fs >= 2024\.6, found 0\.4\.2"):
        resolve_location("s3://bucket/cache").filesystem()


def test_the_cli_prints_one_line_for_an_old_s3fs(monkeypatch):
    _pretend_installed(monkeypatch, "s3fs", "0.4.2")
    result = CliRunner().invoke(app, ["verify", "s3://bucket/cache"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: kdcache needs s3fs >= 2024.6, found 0.4.2: pip install -U 'kdcache[s3]'"
    ]
