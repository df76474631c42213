"""INT4, nibbletune's uniform code book: its table, the 4-bit layer on it, and every refusal to write it as bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from nibbletune.errors import BnbFormatUnsupportedError, NibbletuneError, QuantizationError
from nibbletune.modules.linear_nf4 import LinearNF4
from nibbletune.quant import QuantSettings, codebook, quantize, to_bnb_state_dict
from nibbletune.quant.bnb_format import is_bnb_quantized
from nibbletune.quant.codebooks import codes_are_sorted, quantize_bounds
from nibbletune.quant.reference import reference_dequantize_4bit
from nibbletune.training.config import QuantConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_int4_codebook_is_the_symmetric_uniform_grid():
    values = codebook("int4")
    assert values.dtype == torch.float32 and values.numel() == 16
    assert torch.allclose(values, torch.tensor([(2 * i - 15) / 15 for i in range(16)]), rtol=0, atol=1e-7)
    assert values[0] == -1.0 and values[15] == 1.0  # the block's absmax element is exact
    assert torch.equal(values, -values.flip(0))  # mirror-symmetric, bit for bit
    steps = values[1:] - values[:-1]
    assert torch.allclose(steps, torch.full((15,), 2 / 15), rtol=0, atol=1e-6)  # 16 distinct even levels
    assert not bool((values == 0).any())
    assert codes_are_sorted("int4") and codes_are_sorted("nf4") and not codes_are_sorted("fp4")


def test_int4_codes_are_rounded_uniform_values(gen):
    """code = round(7.5 * (x / absmax + 1)): level i sits at 7.5 * (s + 1) = i, the closed form of nearest."""
    x = torch.randn(40, 64, generator=gen)
    qt = quantize(x, "int4", 64, double_quant=False)
    blocks = x.reshape(-1, 64)
    scaled = blocks / blocks.abs().amax(dim=1, keepdim=True)
    closed_form = torch.clamp(torch.floor((scaled + 1) * 7.5 + 0.5), 0, 15).reshape(-1)
    from nibbletune.quant.blockwise import unpack_nibbles

    codes = unpack_nibbles(qt.packed, qt.numel).long()
    # the closed form and midpoint counting differ only on exact float ties, which randn never hits here
    assert (codes != closed_form.long()).float().mean() < 1e-3
    error = (qt.dequantize() - x).abs().reshape(-1, 64)
    assert bool((error <= blocks.abs().amax(dim=1, keepdim=True) / 15 * (1 + 1e-6)).all())


def test_int4_error_sits_between_nf4_and_fp4_on_gaussian_weights(gen):
    """Recorded on N(0, 1) 256x1024 weights, blocksize 64: MSE nf4 0.0087, int4 0.0103, fp4 0.0152 (x absmax^2 units)."""
    x = torch.randn(256, 1024, generator=gen)
    mse = {q: float(((quantize(x, q, 64, False).dequantize() - x) ** 2).mean()) for q in ("nf4", "fp4", "int4")}
    assert mse["nf4"] < mse["int4"] < mse["fp4"]
    assert mse["int4"] == pytest.approx(0.0103, rel=0.05)


def test_int4_linear_layer_equals_a_linear_on_the_dequantized_weight(gen):
    linear = torch.nn.Linear(96, 48)
    bias = linear.bias.detach().clone()
    layer = LinearNF4.from_linear(linear, QuantSettings(quant_type="int4", compute_dtype="float32"))
    qt = layer.quantized_weight
    assert qt.quant_type == "int4"
    decoded = reference_dequantize_4bit(qt.packed, qt.absmax_float32(), qt.shape, torch.float32, "int4", 64)
    x = torch.randn(5, 96, generator=gen, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(x, decoded, bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ decoded, rtol=1e-5, atol=1e-5)


def test_settings_and_config_accept_int4_and_keep_it_in_the_record():
    settings = QuantConfig(type="int4", blocksize=128).settings()
    assert settings.quant_type == "int4" and "int4" in settings.describe()
    assert QuantSettings.from_record(settings.to_record()) == settings
    with pytest.raises(Exception, match="int4"):
        QuantConfig(type="int8")


def test_bitsandbytes_writers_refuse_int4(gen):
    qt = quantize(torch.randn(8, 64, generator=gen), "int4", 64)
    with pytest.raises(BnbFormatUnsupportedError, match="'int4'.*bitsandbytes has only nf4/fp4") as info:
        to_bnb_state_dict(qt, "layer.weight")
    assert isinstance(info.value, NibbletuneError) and "\n" not in str(info.value)
    with pytest.raises(BnbFormatUnsupportedError, match="int4"):
        QuantSettings(quant_type="int4").bnb_quantization_config()
    with pytest.raises(QuantizationError, match="bnb_4bit_quant_type"):
        QuantSettings.from_bnb_config({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"})
    layer = LinearNF4.from_linear(torch.nn.Linear(64, 8), QuantSettings(quant_type="int4"))
    with pytest.raises(BnbFormatUnsupportedError, match="int4"):
        layer.state_dict()
    # a forged bitsandbytes__int4 entry is not read as a bitsandbytes weight
    assert not is_bnb_quantized({"w.quant_state.bitsandbytes__int4": torch.zeros(1)}, "w")


def test_quantize_command_refuses_int4_in_one_line(tmp_path, capsys):
    from nibbletune.cli.main import main
    from nibbletune.export import quantize_checkpoint

    with pytest.raises(BnbFormatUnsupportedError, match="nibbletune quantize"):
        quantize_checkpoint(tmp_path / "does-not-matter", tmp_path / "out", QuantSettings(quant_type="int4"))
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "out"), "--quant-type", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "int4" in err and "bitsandbytes" in err
    assert not (tmp_path / "out").exists()


def test_int4_nearest_code_search_uses_the_sorted_grid():
    midpoints, order = quantize_bounds("int4")
    assert order.tolist() == list(range(16))
    assert torch.allclose(midpoints, torch.tensor([(2 * i - 14) / 15 for i in range(15)]), rtol=0, atol=1e-7)
