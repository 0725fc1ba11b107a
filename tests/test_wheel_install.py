"""`pip install .` gives the complete toolkit: the wheel carries the recipes, and `maevit recipes`,
`maevit pretrain NAME` and `maevit demo` work from a folder that is not a source checkout.

Offline: the wheel is built without build isolation and installed without its dependencies into a
new venv, which reads torch, timm, ... from this environment's site-packages through a .pth file
(a path line in a .pth adds the folder to sys.path without running that folder's own .pth files,
so this environment's editable install of maevit stays out).
"""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = ("pyproject.toml", "setup.py", "README.md", "maevit", "pretrain", "finetune")


def _run(args: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_the_recipes_and_runs_the_demo_outside_the_checkout(tmp_path):
    # build from a copy of the source (the build leaves build/ and *.egg-info next to its input)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", src],
         tmp_path, env)
    wheel = next((tmp_path / "dist").glob("maevit-*.whl"))
    members = zipfile.ZipFile(wheel).namelist()
    for stage in ("pretrain", "finetune"):  # every top-level recipe is in the wheel
        assert {f"maevit/recipes/{stage}/{p.name}" for p in (REPO / stage).glob("*.yaml")} <= set(members)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    py = venv / "bin" / "python"
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], tmp_path, env)
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    deps = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(purelib.stdout.strip()) / "_maevit_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    work = tmp_path / "elsewhere"  # no pretrain/ or finetune/ here
    work.mkdir()
    where = _run([py, "-c", "import maevit; print(maevit.__file__)"], work, env).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    maevit = venv / "bin" / "maevit"
    listed = _run([maevit, "recipes"], work, env).stdout.splitlines()
    assert len(listed) == len(list(REPO.glob("pretrain/*.yaml")) + list(REPO.glob("finetune/*.yaml")))
    assert any(line.split()[:2] == ["pretrain", "demo"] for line in listed)
    shown = _run([maevit, "pretrain", "cifar10_swin", "--print-config"], work, env).stdout
    assert "mae_swin_tiny_patch4_window7_224" in shown

    tiny = ["pretrain.model.embed_dim=32", "pretrain.model.depth=1", "pretrain.model.num_heads=2",
            "pretrain.model.decoder_embed_dim=32", "pretrain.model.decoder_depth=1",
            "pretrain.model.decoder_num_heads=2", "pretrain.optim.max_steps=2", "pretrain.data.batch_size=16",
            "pretrain.data.num_workers=0", "pretrain.run.progress=false", "pretrain.run.probe_train=bundled:val",
            "pretrain.run.probe_val=bundled:val", "finetune.optim.max_steps=2", "finetune.data.batch_size=16",
            "finetune.data.num_workers=0", "finetune.run.progress=false"]
    demo = _run([maevit, "demo", "--out", "demo", *tiny], work, env)
    assert "fine-tune, 10% labels (500)" in demo.stdout and "MAE pretraining" in demo.stdout
    assert (work / "demo" / "finetune-10-pretrained" / "classifier.safetensors").is_file()
