"""A frozen rank ends the job with a message naming it (issue 20), instead of a hang."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maevit.train.watchdog import Watchdog

REPO = Path(__file__).resolve().parents[1]


def test_verdict_names_the_frozen_rank(tmp_path):
    exits = []
    dogs = [Watchdog(tmp_path, r, 2, timeout_s=1.0, exit_fn=exits.append) for r in range(2)]
    for d in dogs:
        d.start()
        d.beat(5)
    dogs[1]._stop.set()  # rank 1's process "freezes": its thread stops publishing
    time.sleep(3.5)
    assert exits == [1]  # rank 0 ended itself (rank 1's thread is gone)
    dogs[0].close()


def test_a_paused_watch_does_not_fire(tmp_path):
    exits = []
    d = Watchdog(tmp_path, 0, 1, timeout_s=0.5, exit_fn=exits.append).start()
    d.pause()  # e.g. a long evaluation
    time.sleep(1.5)
    assert exits == []
    d.close()


def test_a_paused_rank_still_ends_the_job_when_a_peer_freezes(tmp_path):
    """A paused phase (checkpoint, stop check) holds collectives too: a frozen peer must not hang it."""
    exits = []
    dogs = [Watchdog(tmp_path, r, 2, timeout_s=1.0, exit_fn=exits.append) for r in range(2)]
    for d in dogs:
        d.start()
    dogs[0].pause()  # rank 0 is in a checkpoint, waiting in a barrier
    time.sleep(1.0)
    assert exits == []  # a live peer: a long paused phase is fine
    dogs[1]._stop.set()  # rank 1's process freezes: its record stops being refreshed
    deadline = time.monotonic() + 20  # stale after 5 s (the floor), judged at the next tick
    while not exits and time.monotonic() < deadline:
        time.sleep(0.2)
    assert exits == [1]
    dogs[0].close()


def test_a_paused_rank_ignores_finished_and_earlier_peers(tmp_path):
    exits = []
    (tmp_path / ".progress").mkdir()
    # a record left by an earlier run that was killed: judged only after the timeout, like a rank not started
    (tmp_path / ".progress" / "rank-1.json").write_text(json.dumps({"rank": 1, "alive": time.time() - 100}))
    d = Watchdog(tmp_path, 0, 2, timeout_s=0.5, exit_fn=exits.append).start()
    d.pause()
    time.sleep(1.5)
    assert exits == []
    d.close()
    peer = Watchdog(tmp_path, 1, 2, timeout_s=0.5, exit_fn=exits.append).start()
    d = Watchdog(tmp_path, 0, 2, timeout_s=0.5, exit_fn=exits.append).start()
    peer.close()  # finished: its record is removed
    d.pause()
    time.sleep(6.0)
    assert exits == []
    d.close()


@pytest.mark.slow
def test_a_sigstopped_rank_ends_a_two_process_job_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
            "model.decoder_num_heads=2", "data.train=bundled:train", "data.batch_size=4", "data.num_workers=0",
            "optim.epochs=50", "run.progress=false", "run.precision=fp32", "run.log_every=1", "run.viz_every=0",
            "run.hang_timeout=8", f"run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "maevit.cli", "pretrain", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            f = run_dir / ".progress" / "rank-1.json"
            if f.is_file():
                rec = json.loads(f.read_text())
                if rec["step"] >= 3:
                    victim = rec["pid"]
                    os.kill(victim, signal.SIGSTOP)
            time.sleep(0.2)
        assert victim is not None, "the run never reached step 3"
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=90)
        assert time.monotonic() - t0 < 60  # hang_timeout 8 s, plus the launcher's teardown
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank 1" in err and "stopped responding" in err and "run.hang_timeout=8" in err, err[-3000:]
