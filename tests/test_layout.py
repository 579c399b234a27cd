"""The library's import hygiene: pure modules pull in no heavy system, no module touches logging at import."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys

import ootd

# The stages' pure modules: math, config and splits must stay importable without a cluster, detector or database.
PURE = ["ootd.config", "ootd.detect.boxes", "ootd.evaluate.metrics", "ootd.model.losses", "ootd.splits",
        "ootd.tables", "ootd.decode", "ootd.store.rows", "ootd.model.modeldir"]
HEAVY = ("ray.train", "ultralytics", "pymilvus", "open_clip")

_PROBE = """
import importlib, json, logging, sys
root = logging.getLogger()
before = (list(root.filters), list(root.handlers), root.level)
for name in sys.argv[1:]:
    importlib.import_module(name)
after = (list(root.filters), list(root.handlers), root.level)
print(json.dumps({"modules": sorted(sys.modules), "root_untouched": before == after}))
"""


def _import_in_child(*modules: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(ootd.__path__, "ootd."))


def test_pure_modules_import_no_heavy_system():
    loaded = _import_in_child(*PURE)["modules"]
    for heavy in HEAVY:
        assert not any(m == heavy or m.startswith(heavy + ".") for m in loaded), f"{heavy} imported by {PURE}"


def test_the_serve_app_module_imports_no_training_detector_or_database_library():
    loaded = _import_in_child("ootd.serve.app")["modules"]
    for heavy in ("ray.train", "ultralytics", "pymilvus"):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in loaded), heavy


def test_importing_every_module_leaves_the_root_logger_alone():
    modules = _all_modules()
    assert "ootd.serve.app" in modules and "ootd.train.worker" in modules
    assert _import_in_child(*modules)["root_untouched"]


def _calls_ray_init(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "init":
            if isinstance(func.value, ast.Name) and func.value.id == "ray":
                return True
    return False


def test_the_library_never_starts_ray():
    import importlib.util

    for module in _all_modules():
        source = open(importlib.util.find_spec(module).origin).read()
        # The CLI front end connects to (or starts) a cluster; the doctor probes Ray in a child process.
        if module != "ootd.cli":
            assert not _calls_ray_init(source), module
