import pytest

from selfhost.onnx.export import export_onnx  # needs selfhost[onnx], which '.[dev]' brings
from selfhost.onnx.export_info import OnnxExportConfig


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """Factory: (checkpoint folder, OnnxExportConfig fields) -> its export folder, built once per session."""
    cache = {}

    def build(model_dir, **fields):
        key = (str(model_dir), tuple(sorted(fields.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("onnx") / "export"
            cache[key] = export_onnx(model_dir, out, OnnxExportConfig(**fields)).folder
        return cache[key]

    return build
