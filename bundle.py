"""The exported model's bundle: <category>.onnx (or .xml + .bin) and the JSON contract beside it, which export.py
writes and predict_exported.py reads. torch-free."""
from __future__ import annotations

import json
from pathlib import Path

from config import UserError
from images import file_sha256

FORMAT, VERSION = "patchcore-export", 1
FORMATS = {".onnx": "onnx", ".xml": "openvino"}  # the format of each model file
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}  # the runtime each format runs on by default


def read_bundle(model: Path) -> dict:
    """The contract beside ``model`` (<category>.json), checked: its format and version, and the SHA-256 of every
    model file it names; UserError naming the file otherwise."""
    if model.suffix not in FORMATS:
        raise UserError(f"'{model}' is not an exported model: pass <category>.onnx or <category>.xml")
    path = model.with_suffix(".json")
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no '{path}' beside '{model}': export the model with export.py, which writes both") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read '{path}' ({err}): export the model again with export.py") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise UserError(f"'{path}' is not the contract of an exported PatchCore model: export it with export.py")
    if bundle.get("version") != VERSION:
        raise UserError(f"'{path}' has bundle version {bundle.get('version')}, this runner reads {VERSION}: export "
                        f"the model again with this version's export.py")
    files = bundle["model"]["files"].get(FORMATS[model.suffix], {})
    if model.name not in files:
        raise UserError(f"'{path}' does not describe '{model.name}' (it is from another export): export the model "
                        f"again")
    for name, expected in files.items():
        if file_sha256(model.parent / name) != expected:
            raise UserError(f"'{model.parent / name}' does not match its SHA-256 in '{path}' (missing, damaged, or "
                            f"from another export): export the model again")
    return bundle


def exported_formats(path: Path, model_id: str) -> dict[str, dict[str, str]]:
    """The formats (and their files' SHA-256) that the bundle JSON at ``path`` lists for the model ``model_id``:
    exporting a model in a second format keeps the first; another model's bundle is replaced."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        return dict(earlier["model"]["files"]) if earlier.get("model_id") == model_id else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
