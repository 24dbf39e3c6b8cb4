"""What selfhost knows before running anything: models, devices, licences and API prices.

The facts live in data/*.toml; the modules here only read and validate them.
Import-light on purpose (stdlib only) so `selfhost run` can resolve aliases cheaply.
"""

from selfhost.catalog.architecture import Architecture
from selfhost.catalog.devices import DeviceSpec, get_device, load_devices
from selfhost.catalog.licences import Licence, get_licence, load_licences
from selfhost.catalog.models import ModelSpec, get_model, load_models, resolve_alias
from selfhost.catalog.prices import ApiPrice, get_api_price, load_api_prices

__all__ = [
    "ApiPrice",
    "Architecture",
    "DeviceSpec",
    "Licence",
    "ModelSpec",
    "get_api_price",
    "get_device",
    "get_licence",
    "get_model",
    "load_api_prices",
    "load_devices",
    "load_licences",
    "load_models",
    "resolve_alias",
]
