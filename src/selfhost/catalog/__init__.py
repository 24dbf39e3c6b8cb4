"""What selfhost knows before running anything: models, devices, licences and API prices.

The facts live in data/*.toml; the modules here only read and validate them.
Import-light on purpose (stdlib only) so `selfhost run` can resolve aliases cheaply.
"""

from selfhost.catalog.architecture import Architecture
from selfhost.catalog.devices import DeviceSpec, get_device, load_devices
from selfhost.catalog.licences import Licence, get_licence, load_licences
from selfhost.catalog.models import ModelSpec, get_model, load_models, resolve_alias
from selfhost.catalog.prices import ApiModel, PriceCatalog, load_price_catalog

__all__ = [
    "ApiModel",
    "Architecture",
    "DeviceSpec",
    "Licence",
    "ModelSpec",
    "PriceCatalog",
    "get_device",
    "get_licence",
    "get_model",
    "load_devices",
    "load_licences",
    "load_models",
    "load_price_catalog",
    "resolve_alias",
]
