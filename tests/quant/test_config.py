import pytest

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.quant.config import QuantConfig


def test_unknown_method_is_named():
    with pytest.raises(InvalidParameterError, match="'int3'.*int8, int4"):
        QuantConfig(method="int3")


def test_unknown_head_method_is_named():
    with pytest.raises(InvalidParameterError, match="'fp8'"):
        QuantConfig(method="int8", head_method="fp8")


@pytest.mark.parametrize("group_size", [0, 3, -64])
def test_bad_group_size_is_named(group_size):
    with pytest.raises(InvalidParameterError, match=str(group_size)):
        QuantConfig(method="int4", group_size=group_size)


def test_group_size_is_for_int4_only():
    with pytest.raises(InvalidParameterError, match="group size 64 applies to int4 only"):
        QuantConfig(method="int8", group_size=64)


def test_group_size_not_dividing_a_layer_names_value_layer_and_options():
    config = QuantConfig(method="int4", group_size=128)
    with pytest.raises(InvalidParameterError, match=r"group size 128 does not divide the 576 input features of .*qkv_proj.*64, 32, 16"):
        config.resolved({"model.layers.0.self_attn.qkv_proj": 576, "model.layers.0.mlp.down_proj": 1536})


def test_default_group_size_is_the_largest_that_divides_every_layer():
    assert QuantConfig(method="int4").resolved({"a": 576, "b": 1536}).group_size == 64
    assert QuantConfig(method="int4").resolved({"a": 4096, "b": 11008}).group_size == 128
    with pytest.raises(InvalidParameterError, match="no int4 group size"):
        QuantConfig(method="int4").resolved({"a": 100})


def test_json_round_trip_and_foreign_methods():
    config = QuantConfig(method="int4", group_size=32, symmetric=True, skip_modules=("lm_head",))
    assert QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(UnsupportedModelError, match="'gptq'"):
        QuantConfig.from_json({"quant_method": "gptq", "bits": 4})
