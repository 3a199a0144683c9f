import os
import tempfile

import pytest

# No hub lookups in tests: a failed one retries for ~20 s before giving up.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inductor's compiled kernels are shared by every test and kept between sessions (a cold compile
# takes half a minute, a warm one seconds), away from the user's own cache folder.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "bitnet-tests-inductor"))


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
