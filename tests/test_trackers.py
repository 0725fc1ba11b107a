"""`run.tracker`: the run's hyper-parameters, metrics and images reach the tracker, read back from
TensorBoard's own files; a tracker that is not installed is a usage error with its pip command."""
import os

import pytest

from maevit.cli import main
from maevit.config import ConfigError, load_config
from maevit.train.trackers import PACKAGES, resolve_tracker, tracker_available
from tests.tiny_runs import TINY_PRETRAIN

TINY = [t for t in TINY_PRETRAIN if not t.startswith("run.viz_every")] + [
    "optim.max_steps=2", "run.log_every=1", "run.viz_every=2"]


def _pretrain(run_dir, *extra):
    from maevit.train.pretrain import PretrainConfig, train

    return train(load_config(PretrainConfig, None, [*TINY, f"run.dir={run_dir}", *extra]))


def _events(folder):
    """Every event file under ``folder`` read back: {subfolder: EventAccumulator}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for root, _, files in os.walk(folder):
        if any(f.startswith("events.out.tfevents") for f in files):
            ea = EventAccumulator(root, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
            ea.Reload()
            out[root] = ea
    return out


def test_tensorboard_gets_hyperparameters_metrics_grids_and_curves(tmp_path, one_thread):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    _pretrain(run, "run.tracker=tensorboard", "optim.base_lr=0.002")
    events = _events(run / "tensorboard")
    main_ea = events[str(run / "tensorboard")]
    loss = main_ea.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2] and all(e.value > 0 for e in loss)
    assert {"train/lr", "train/images_per_sec"} <= set(main_ea.Tags()["scalars"])
    for tag in ("reconstruction", "curves"):  # the PNGs the run writes, as TensorBoard images
        (image,) = main_ea.Images(tag)
        assert image.step == 2 and image.width > 32 and image.height > 32
        assert image.encoded_image_string.startswith(b"\x89PNG")
    # the resolved config as hyper-parameters (TensorBoard's hparams plugin)
    hparams = {}
    for ea in events.values():
        try:
            content = ea.PluginTagToContent("hparams")
        except KeyError:  # an event file without hyper-parameters
            continue
        if "_hparams_/session_start_info" in content:
            info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
            hparams = {k: v.number_value or v.string_value for k, v in info.session_start_info.hparams.items()}
    assert hparams["optim.base_lr"] == pytest.approx(0.002) and hparams["model.name"] == "mae_vit_tiny_patch16"
    assert hparams["run.tracker"] == "tensorboard"


def test_no_tracker_writes_no_tracker_files(tmp_path, one_thread):
    run = tmp_path / "run"
    _pretrain(run, "run.tracker=none")
    assert not (run / "tensorboard").exists() and (run / "metrics.jsonl").is_file()


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_a_tracker_that_is_not_installed_is_refused_with_its_pip_command(name, tmp_path, capsys):
    if tracker_available(name):
        pytest.skip(f"{name} is installed here")
    with pytest.raises(ConfigError, match=f"pip install {PACKAGES[name]}"):
        resolve_tracker(name)
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, f"run.dir={run}", f"run.tracker={name}"]) == 2
    err = capsys.readouterr().err
    assert f"pip install {PACKAGES[name]}" in err and "Traceback" not in err
    assert not run.exists()  # refused before anything was written


def test_a_tracker_that_cannot_start_is_a_usage_error(tmp_path, monkeypatch, capsys, one_thread):
    """E.g. W&B without a login: what the tracker said, and the way out, instead of a traceback."""
    from accelerate.tracking import TensorBoardTracker

    def refuse(self):
        raise RuntimeError("no credentials for this tracker")

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    assert main(["pretrain", *TINY, f"run.dir={tmp_path / 'run'}", "run.tracker=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "could not start (RuntimeError: no credentials for this tracker)" in err and "run.tracker=none" in err
    assert "Traceback" not in err


def test_unknown_tracker_names_the_choices(capsys):
    assert main(["pretrain", *TINY, "run.tracker=tensorbored", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "run.tracker" in err and "tensorboard" in err


@pytest.mark.skipif(not tracker_available("wandb"), reason="wandb is not installed")
def test_wandb_offline_run_lives_in_the_run_directory(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    _pretrain(run, "run.tracker=wandb")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())
    assert list((run / "wandb").rglob("media/images/reconstruction*.png"))


@pytest.mark.skipif(not tracker_available("mlflow"), reason="mlflow is not installed")
def test_mlflow_file_store_gets_params_metrics_and_images(tmp_path, monkeypatch, one_thread):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a file store needs no server
    run = tmp_path / "run"
    _pretrain(run, "run.tracker=mlflow")
    client = mlflow.tracking.MlflowClient()
    (found,) = client.search_runs([client.get_experiment_by_name("maevit").experiment_id])
    assert found.data.params["model.name"] == "mae_vit_tiny_patch16" and "train/loss" in found.data.metrics
    assert any("reconstruction" in a.path for a in client.list_artifacts(found.info.run_id, "images"))


@pytest.mark.skipif(not tracker_available("dvclive"), reason="dvclive is not installed")
def test_dvclive_writes_inside_the_run_directory(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # inside a Git repository DVCLive runs `dvc init` there: not in this checkout
    run = tmp_path / "run"
    _pretrain(run, "run.tracker=dvclive")
    assert (run / "dvclive" / "params.yaml").is_file() and (run / "dvclive" / "plots" / "images").is_dir()
