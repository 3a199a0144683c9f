import os
import tempfile

import pytest

# No hub lookups in tests: a failed one retries for ~20 s before giving up.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inductor's compiled kernels are shared by every test and kept between sessions (a cold compile
# takes half a minute, a warm one seconds), away from the user's own cache folder.
# One per forced ATen capability (CI runs the engine tests as other CPUs would): inductor's cache
# key leaves the capability out, and a compiled function from another one computed NaN.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"bitnet-tests-inductor-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))
# The 2-bit kernel likewise: built once (half a minute), shared by every test and subprocess.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      os.path.join(tempfile.gettempdir(), "bitnet-tests-extensions"))


@pytest.fixture(scope="session", autouse=True)
def ternary_kernel():
    """Built before the first test, so that no test's output holds the one-time compile note."""
    from bitnet_cli.nn.kernel import ternary_ops
    return ternary_ops()[0]


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


@pytest.fixture(autouse=True)
def every_core(monkeypatch):
    """Training in-process keeps to every core: what other work the machine runs at the time
    would otherwise add a "sharing the CPU" note to a test's output now and then (test_cpu.py
    tests the cores a run keeps to, with a machine it makes up)."""
    from bitnet_cli.training import session
    monkeypatch.setattr(session, "CoreFollower", lambda: None)


@pytest.fixture(scope="session")
def fresh_threads():
    """The thread count torch starts with in a fresh process."""
    import torch
    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads(fresh_threads):
    """`chat` in-process sets torch's thread count from the cores idle at that instant (one,
    while the suite itself keeps a core busy): put it back, so that a later test trains on the
    threads a fresh process would, and its floats do not depend on the machine's load."""
    yield
    import torch
    torch.set_num_threads(fresh_threads)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """short_run(experiment): the run folder of a short run of the experiment's tiny size (see
    tests.models.train_short_run), trained once for the whole session and shared by the tests
    that only read it. At the end of the session each must still be exactly as trained."""
    from tests.models import folder_digest, train_short_run
    runs = {}

    def get(experiment: str):
        if experiment not in runs:
            run = train_short_run(tmp_path_factory.mktemp(f"shared-{experiment}"), experiment)
            runs[experiment] = run, folder_digest(run)
        return runs[experiment][0]

    yield get
    for experiment, (run, digest) in runs.items():
        assert folder_digest(run) == digest, f"a test changed the shared {experiment} run"
