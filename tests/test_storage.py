"""The one path/URL resolver: no URL is ever taken for a local path; options and sizes parse."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cache.errors import ConfigError
from kdcache.cache.read.reader import open_cache
from kdcache.cache.storage.location import parse_storage_options, resolve_location
from kdcache.cache.storage.shard_sources import parse_size
from kdcache.cli.app import app


def test_local_paths_and_file_urls_are_local(tmp_path):
    assert resolve_location(tmp_path / "c").local_path == tmp_path / "c"
    assert resolve_location("relative/dir").local_path == Path("relative/dir")
    location = resolve_location(f"file://{tmp_path}/c")
    assert not location.is_remote and location.local_path == tmp_path / "c"


def test_urls_keep_their_scheme_and_path():
    location = resolve_location("s3://bucket/some/prefix/", {"endpoint_url": "http://x"})
    assert (location.scheme, location.path, location.url) == (
        "s3",
        "bucket/some/prefix",
        "s3://bucket/some/prefix",
    )
    assert location.child("shards", "a.arrow") == "bucket/some/prefix/shards/a.arrow"


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("foo://bucket/x", r"unknown URL scheme foo://"),
        ("s3:/bucket/x", r"missing slash \(write s3://...\); for a local path of that name"),
        ("s3://", r"names no bucket or path"),
    ],
)
def test_bad_urls_are_refused(where, match):
    with pytest.raises(ConfigError, match=match):
        resolve_location(where)


def test_a_missing_filesystem_names_the_extra_to_install():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here, so its absence cannot be shown")
    except ImportError:
        pass
    with pytest.raises(
        ConfigError, match=r'gs:// URLs need the gcsfs package: pip install "kdcache\[gcs\]"'
    ):
        open_cache("gs://bucket/cache")


def test_storage_options_parse_values_and_nested_keys():
    options = parse_storage_options(
        ["endpoint_url=http://127.0.0.1:9000", "anon=true", "max_concurrency=4",
         "client_kwargs.region_name=eu-west-1", "secret=a=b"]
    )  # fmt: skip
    assert options == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": True,
        "max_concurrency": 4,
        "client_kwargs": {"region_name": "eu-west-1"},
        "secret": "a=b",
    }
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_storage_options(["endpoint_url"])
    with pytest.raises(ConfigError, match="applies to URLs only"):
        resolve_location("local/dir", {"anon": True})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("123", 123), ("2KB", 2000), ("1.5MiB", 3 << 19), ("20GiB", 20 << 30), (7, 7)],
)
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "12 parsecs", "-5MB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ConfigError, match="is not understood"):
        parse_size(text)


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "foo://bucket/c"],
        ["verify", "s3:/bucket/c"],
        ["eval", "--cache", "nope://b/c", "--student", "x"],
        ["train", "--cache", "foo://b/c", "--student", "x", "--out", "run"],
        ["build", "--teacher", "t", "--data", "d", "--out", "foo://b/c"],
        ["pull", "foo://b/c", "local"],
        ["push", "local", "relative/not-a-url"],
        ["train", "--cache", "c", "--student", "x", "--out", "r", "--cache-limit", "lots"],
    ],
)
def test_cli_refuses_bad_locations_in_one_line(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "push":
        (tmp_path / "local").mkdir()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert not any(tmp_path.glob("*:")), "a URL was taken for a local path"
