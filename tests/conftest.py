import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present. It must be
# set before any kernel is defined, so before fusedres is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI builds the C++/CUDA extension and sets FUSEDRES_REQUIRE_EXT=1: a build that did not
# happen must fail the run, not skip the extension's tests.
if os.environ.get("FUSEDRES_REQUIRE_EXT") == "1":
    from fusedres import ext

    if ext.load_error():
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXT=1 but {ext.load_error()}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch, tmp_path_factory):
    torch.manual_seed(0)
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    # `auto` on a GPU caches its tuning results on disk: keep the tests' out of ~/.cache.
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusedres-cache"))
