import os

import pytest

# No hub lookups in tests: a failed one retries for ~20 s before giving up.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def bitnet_home(tmp_path, monkeypatch):
    """Every test gets its own runs folder; nothing touches the user's real data folder."""
    home = tmp_path / "bitnet-home"
    monkeypatch.setenv("BITNET_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def bitnet_cache(tmp_path, monkeypatch):
    """Token shards go to a per-test cache folder too."""
    cache = tmp_path / "bitnet-cache"
    monkeypatch.setenv("BITNET_CACHE", str(cache))
    return cache
