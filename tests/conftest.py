import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def shipped_profiles_only(monkeypatch, tmp_path):
    """Plans in tests use the shipped profiles, whatever `mtc probe` saved on this machine."""
    monkeypatch.setenv("MTC_PROFILE", str(tmp_path / "no-profile.json"))
