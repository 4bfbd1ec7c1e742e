import pytest

import mtc
from mtc.config import parse_bytes


@pytest.mark.parametrize("value, expected", [
    ("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("1.5 GiB", int(1.5 * 2**30)),
    ("100", 100), (4096, 4096), ("7kib", 7 * 1024),
])
def test_parse_bytes_accepts_the_documented_forms(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["", "80 parsecs", "GB", "-1GB", 0, -5, "0MB", 1.5, True, None])
def test_parse_bytes_names_the_argument_value_and_accepted_forms(value):
    with pytest.raises(ValueError) as error:
        parse_bytes(value, "gpu_mem")
    message = str(error.value)
    assert "gpu_mem=" in message and repr(value) in message and "'80GB'" in message


@pytest.mark.parametrize("field, kwargs", [("lr", {"lr": -1.0}), ("betas", {"betas": (0.9, 1.0)}),
                                           ("eps", {"eps": -1e-8}), ("weight_decay", {"weight_decay": -0.1})])
def test_adamw_rejects_bad_hyperparameters_by_name(field, kwargs):
    with pytest.raises(ValueError, match=f"AdamW {field}="):
        mtc.AdamW(**kwargs)
