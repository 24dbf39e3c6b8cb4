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
        config.check_layers({"model.layers.0.self_attn.qkv_proj": 576, "model.layers.0.mlp.down_proj": 1536})


def test_default_group_size_is_per_layer_the_largest_that_divides():
    config = QuantConfig(method="int4")
    config.check_layers({"a": 576, "b": 1536, "c": 432})
    assert [config.group_size_for(k) for k in (576, 1536, 432, 4096)] == [64, 128, 16, 128]
    assert QuantConfig(method="int4", group_size=32).group_size_for(4096) == 32
    with pytest.raises(InvalidParameterError, match="no int4 group size .* 100 input features of a"):
        config.check_layers({"a": 100})


def test_head_method_defaults_to_the_method():
    assert QuantConfig(method="int4").resolved_head_method == "int4"
    assert QuantConfig(method="int8", head_method="int4").uses_groups
    assert QuantConfig(method="int8", head_method="int4", group_size=32).group_size == 32


def test_json_round_trip_and_foreign_methods():
    config = QuantConfig(method="int4", group_size=32, symmetric=True, skip_modules=("lm_head",))
    assert QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(UnsupportedModelError, match="'gptq'"):
        QuantConfig.from_json({"quant_method": "gptq", "bits": 4})
