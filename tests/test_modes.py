"""The storage mode of a cache follows from its manifest's top_k and tail_samples."""

import pytest

from kdcache.cache.errors import CacheError
from kdcache.cache.format.modes import STORAGE_MODES, storage_mode


@pytest.mark.parametrize(
    ("top_k", "tail_samples", "expected"),
    [
        (64, 0, "topk_bucket"),
        (64, None, "topk_bucket"),  # caches written before tail samples existed
        (24, 16, "topk_samples"),
        (0, 64, "samples"),
    ],
)
def test_storage_mode_from_manifest(top_k, tail_samples, expected):
    manifest = {"top_k": top_k}
    if tail_samples is not None:
        manifest["tail_samples"] = tail_samples
    assert storage_mode(manifest) == expected
    assert expected in STORAGE_MODES


def test_storage_mode_refuses_an_empty_target():
    with pytest.raises(CacheError, match="neither top-k entries nor samples"):
        storage_mode({"top_k": 0, "tail_samples": 0})
