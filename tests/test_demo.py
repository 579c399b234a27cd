"""`ootd demo`'s own logic: the loud fallback to the tiny model and the resumable stage log."""

from __future__ import annotations

from ootd.config import load_config, with_overrides
from ootd.demo import StageLog, resolve_demo_config


def test_without_marqo_weights_the_demo_falls_back_to_tiny_loudly_keeping_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    overrides = ["train.epochs=8", "serve.port=9100"]
    chosen = resolve_demo_config(load_config("default", overrides), overrides)
    assert chosen.model.backbone == "tiny" and chosen.train.epochs == 8 and chosen.serve.port == 9100
    said = capsys.readouterr().out
    assert "Falling back to the TINY offline model" in said and "Marqo/marqo-fashionSigLIP" in said


def test_a_locally_available_backbone_is_kept(tiny_config, capsys):
    assert resolve_demo_config(tiny_config) is tiny_config
    assert "Falling back" not in capsys.readouterr().out


def test_finished_stages_are_reused_until_the_config_input_or_weights_change(tiny_config, tmp_path):
    calls: list[str] = []

    def stage(name: str):
        return lambda: calls.append(name) or {"stage": name}

    first = StageLog(tmp_path, tiny_config, "photos")
    assert first.run("ingest", "ingest", stage("ingest")) == {"stage": "ingest"}
    again = StageLog(tmp_path, tiny_config, "photos")
    assert again.run("ingest", "ingest", stage("ingest")) == {"stage": "ingest"}
    assert calls == ["ingest"]  # the second run read the result back
    StageLog(tmp_path, with_overrides(tiny_config, ["train.epochs=2"]), "photos").run("ingest", "ingest",
                                                                                     stage("ingest"))
    StageLog(tmp_path, tiny_config, "other-photos").run("ingest", "ingest", stage("ingest"))
    assert calls == ["ingest", "ingest", "ingest"]
    # The same config naming a detector file whose content changed: nothing is reused.
    detector = tmp_path / "det.pt"
    detector.write_bytes(b"round 1")
    named = with_overrides(tiny_config, [f"detect.weights={detector}"])
    StageLog(tmp_path, named, "photos").run("ingest", "ingest", stage("ingest"))
    StageLog(tmp_path, named, "photos").run("ingest", "ingest", stage("ingest"))
    assert calls == ["ingest"] * 4
    detector.write_bytes(b"round 2")
    StageLog(tmp_path, named, "photos").run("ingest", "ingest", stage("ingest"))
    assert calls == ["ingest"] * 5


def test_changed_settings_clear_the_outputs_a_stage_would_resume_from(tiny_config, tmp_path):
    # ingest skips photos already in crops/: crops cut by the old detector settings must not survive a change
    StageLog(tmp_path, tiny_config, "photos", derived=("crops",)).run("ingest", "ingest", lambda: {})
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "part-0.parquet").write_bytes(b"old crops")
    StageLog(tmp_path, tiny_config, "photos", derived=("crops",))
    assert (tmp_path / "crops" / "part-0.parquet").exists()  # same settings: kept for the stages to reuse
    StageLog(tmp_path, with_overrides(tiny_config, ["detect.flip_average=true"]), "photos", derived=("crops",))
    assert not (tmp_path / "crops").exists()
