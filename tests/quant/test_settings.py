"""QuantSettings: validation, the adapter-record JSON, and the bitsandbytes / transformers spelling."""

import pytest
import torch

from nibbletune.errors import QuantizationError
from nibbletune.quant import QuantSettings


def test_defaults_and_validation():
    settings = QuantSettings()
    assert (settings.quant_type, settings.blocksize, settings.double_quant, settings.compute_dtype) == \
        ("nf4", 64, True, "auto")
    assert QuantSettings(compute_dtype=torch.bfloat16).compute_dtype == "bfloat16"
    assert QuantSettings(skip_modules=["down_proj"]).skip_modules == ("down_proj",)  # lists become tuples
    for bad, message in [({"quant_type": "int3"}, "quant_type"), ({"blocksize": 48}, "blocksize"),
                         ({"double_quant": "yes"}, "double_quant"), ({"compute_dtype": "float64"}, "compute_dtype"),
                         ({"skip_modules": "down_proj"}, "list of module names")]:
        with pytest.raises(QuantizationError, match=message):
            QuantSettings(**bad)
    with pytest.raises(AttributeError):
        settings.blocksize = 128  # frozen: one object travels through every stage unchanged


def test_record_round_trip_and_errors():
    settings = QuantSettings("fp4", 128, False, "bfloat16", ("model.layers.0.mlp.down_proj",))
    assert QuantSettings.from_record(settings.to_record()) == settings
    assert QuantSettings.from_record({"quant_type": "nf4", "blocksize": 64, "double_quant": True}).compute_dtype == "auto"
    with pytest.raises(QuantizationError, match="lack"):
        QuantSettings.from_record({"quant_type": "nf4"}, source="x.json")
    with pytest.raises(QuantizationError, match="x.json: blocksize"):
        QuantSettings.from_record({"quant_type": "nf4", "blocksize": 3, "double_quant": True}, source="x.json")


def test_resolved_and_changes(monkeypatch):
    monkeypatch.setenv("NIBBLETUNE_AUTO_COMPUTE_DTYPE", "bfloat16")
    assert QuantSettings().resolved().compute_dtype == "bfloat16"
    monkeypatch.setenv("NIBBLETUNE_AUTO_COMPUTE_DTYPE", "float32")
    assert QuantSettings().resolved().compute_dtype == "float32"
    assert QuantSettings(compute_dtype="float16").resolved().compute_dtype == "float16"
    assert QuantSettings().with_changes(blocksize=None, quant_type="fp4") == QuantSettings(quant_type="fp4")


def test_bitsandbytes_config_both_ways():
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                             llm_int8_skip_modules=["lm_head", "down_proj"])
    settings = QuantSettings.from_bnb_config(config)
    assert settings == QuantSettings("nf4", 64, True, "bfloat16", ("lm_head", "down_proj"))
    assert QuantSettings.from_bnb_config(config.to_dict()) == settings
    # bitsandbytes' own default code book is fp4, without double quant
    assert QuantSettings.from_bnb_config(transformers.BitsAndBytesConfig(load_in_4bit=True)) == \
        QuantSettings("fp4", 64, False, "float32")
    saved = QuantSettings("fp4", 64, False, "float16").bnb_quantization_config()
    again = transformers.BitsAndBytesConfig.from_dict(dict(saved))
    assert QuantSettings.from_bnb_config(again) == QuantSettings("fp4", 64, False, "float16")
    with pytest.raises(QuantizationError, match="4-bit"):
        QuantSettings.from_bnb_config(transformers.BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(QuantizationError, match="quant_storage"):
        QuantSettings.from_bnb_config(transformers.BitsAndBytesConfig(load_in_4bit=True,
                                                                      bnb_4bit_quant_storage=torch.bfloat16))
