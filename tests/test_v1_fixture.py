"""Every older cache stays readable: the checked-in format_version 1 caches of
``tests/fixtures/v1/`` (written by the last v1 kdcache, ``tests/fixtures/make_v1_caches.py``)
read back with today's reader exactly as the v1 reader returned them (``expected.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.format.blocks import SUPPORTED_FORMAT_VERSIONS
from kdcache.cache.read.reader import open_cache

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def test_version_1_is_still_supported():
    assert 1 in SUPPORTED_FORMAT_VERSIONS


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_a_v1_cache_reads_its_recorded_values(layout):
    cache = open_cache(FIXTURES / layout)
    assert cache.manifest["format_version"] == 1
    records = list(cache.sequences("train"))
    assert [r.sequence_id for r in records] == [e["sequence_id"] for e in EXPECTED[layout]]
    for record, expected in zip(records, EXPECTED[layout], strict=True):
        for name, value in expected.items():
            if name == "sequence_id":
                continue
            got = getattr(record, name)
            if value is None:
                assert got is None, name
                continue
            want = np.array(value, dtype=got.dtype).reshape(got.shape)
            np.testing.assert_array_equal(got, want, err_msg=f"{layout} {name}")


def test_v1_caches_pass_verify():
    from kdcache.cache.read.verify import verify_cache

    for layout in EXPECTED:
        assert verify_cache(FIXTURES / layout) == [], layout
