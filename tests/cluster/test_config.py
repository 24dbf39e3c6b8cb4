"""ClusterConfig: checked once, turned into Ray Serve's deployment arguments."""

import pytest

from selfhost.cluster.config import STREAM_SLOTS, ClusterConfig
from selfhost.errors import InvalidParameterError


def test_fixed_replicas_become_num_replicas_with_each_replicas_share():
    options = ClusterConfig(replicas=3, cpus_per_replica=2, gpus_per_replica=0.5).deployment_options()
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert options["request_router_config"]["request_router_class"] == "selfhost.cluster.router:PrefixAffinityRouter"


def test_autoscale_becomes_serves_autoscaling_config():
    options = ClusterConfig(autoscale=(1, 4), target_ongoing_requests=2, routing="round_robin").deployment_options()
    assert "num_replicas" not in options
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (1, 4, 1)
    assert scaling["target_ongoing_requests"] == 2
    assert options["request_router_config"]["request_router_class"].endswith("RoundRobinRouter")


def test_round_trip_through_json_arguments():
    config = ClusterConfig(autoscale=(2, 5), cpus_per_replica=1.5)
    assert ClusterConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs", [{"replicas": 0}, {"autoscale": (3, 2)}, {"autoscale": (0, 2)},
                                    {"cpus_per_replica": 0}, {"gpus_per_replica": -1}, {"routing": "random"}])
def test_bad_values_name_themselves(kwargs):
    with pytest.raises(InvalidParameterError):
        ClusterConfig(**kwargs)


def test_autoscale_text():
    assert ClusterConfig.parse_autoscale("1,4") == (1, 4)
    for bad in ("4", "a,b", "1,2,3"):
        with pytest.raises(InvalidParameterError, match="MIN,MAX"):
            ClusterConfig.parse_autoscale(bad)


def test_unknown_setting_is_refused():
    with pytest.raises(InvalidParameterError, match="unknown cluster setting"):
        ClusterConfig.from_dict({"replica": 2})


def test_multiplexed_streams_keep_slots_for_the_front_ends_delta_streams():
    options = ClusterConfig(max_ongoing_requests=10).deployment_options()
    assert options["max_ongoing_requests"] == 10 + STREAM_SLOTS
    assert options["request_router_config"]["request_router_kwargs"]["max_ongoing"] == 10
    assert ClusterConfig(max_ongoing_requests=10, multiplex_streams=False).deployment_options()[
        "max_ongoing_requests"] == 10
