"""The scale-out configs are valid by Ray's own schema checks."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_cluster_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema error
    node_types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert {"cpu_ingest", "gpu_train_serve"} <= set(node_types)
    assert any("pip install" in cmd and "ootd" in cmd for cmd in config["setup_commands"])
    assert "/mnt/shared" in " ".join(config["initialization_commands"])


def test_serve_config_yaml_passes_ray_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    spec = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(spec)  # raises on any schema error
    (app,) = schema.applications
    assert app.import_path == "ootd.serve.app:build_app" and app.route_prefix == "/"
    assert schema.http_options.host == "127.0.0.1"  # bind loopback unless told otherwise
