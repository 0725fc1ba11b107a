"""A rank that stops making progress ends the job with a message naming it, instead of a silent hang.

Collective operations wait for every rank, so one frozen process (SIGSTOP, a stuck driver or file
system) freezes the whole job, and torch's collective timeout only fires after tens of minutes with
a message that names no rank. Each rank runs a small thread (:class:`Watchdog`) that:

- publishes, every few seconds, ``RUN_DIR/.progress/rank-R.json``: the last optimizer step this rank
  finished, when, what it is doing now (``data``: waiting for a batch; ``step``: computing or in a
  collective), and when the thread last ran (a frozen process stops its thread too);
- when its own rank has made no step for ``run.hang_timeout`` seconds, reads the other ranks' files,
  names the rank that stopped (a frozen process first, then one stuck waiting for data, then the
  lowest step), prints that, and ends its process (exit 1), so the launcher tears the job down.

Only the training steps are timed: evaluation, checkpoints and other hooks run with the timer
paused (they may legitimately take long). A paused rank still watches the others: those phases hold
collectives too (the stop check, the checkpoint's barriers), so a peer whose thread stops publishing
(a frozen or killed process) ends the job there as well, instead of a hang that no timer would see. The
main thread only stores a step number and a time per step: no file I/O, no host sync.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from maevit.runlayout import PROGRESS_DIR


class Watchdog:
    """See the module docstring. ``timeout_s`` <= 0 turns it off (every method is then a no-op).

    Args:
        run_dir: the run directory (shared by all ranks).
        rank, world_size: this process and how many there are.
        timeout_s: seconds without a finished step before the job is ended.
        exit_fn: how the process ends (tests replace it).
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, timeout_s: float,
                 exit_fn=os._exit) -> None:
        self.dir = Path(run_dir) / PROGRESS_DIR
        self.rank, self.world, self.timeout = rank, world_size, float(timeout_s)
        self.exit_fn = exit_fn
        self.step, self.phase, self.last = 0, "start", time.monotonic()
        self._peers: dict[int, tuple[float, float]] = {}  # rank -> its record's "alive", when seen to change
        self.paused = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick = max(0.2, min(5.0, self.timeout / 5)) if self.timeout > 0 else 0.0

    # ---- the main thread's side: a store per call, nothing more
    def beat(self, step: int) -> None:
        """An optimizer step finished."""
        self.step, self.phase, self.last = step, "step", time.monotonic()

    def waiting_for_data(self) -> None:
        self.phase = "data"

    def computing(self) -> None:
        self.phase = "step"

    def pause(self) -> None:
        """Stop watching (evaluation, checkpoints): they may legitimately take long."""
        self.paused = True

    def resume(self) -> None:
        self.paused, self.last = False, time.monotonic()

    # ---- the thread
    def start(self) -> "Watchdog":
        if self.timeout <= 0:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        self._thread = threading.Thread(target=self._run, name="maevit-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.tick + 1)
        (self.dir / f"rank-{self.rank}.json").unlink(missing_ok=True)

    def _publish(self) -> None:
        record = {"rank": self.rank, "pid": os.getpid(), "step": self.step, "phase": self.phase,
                  "idle_s": round(time.monotonic() - self.last, 1), "paused": self.paused, "alive": time.time()}
        tmp = self.dir / f".rank-{self.rank}.json.tmp"
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.dir / f"rank-{self.rank}.json")
        except OSError:
            pass  # a full or stuck disk must not stop the watch itself

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            self._publish()
            frozen = self._frozen_peers()  # every tick, so a peer that froze before a pause is known
            if frozen or (not self.paused and time.monotonic() - self.last > self.timeout):
                print(f"maevit: error: {self.verdict()}", file=sys.stderr, flush=True)
                self.exit_fn(1)
                return

    def _frozen_peers(self) -> list[int]:
        """Other ranks whose record has not changed for longer than the timeout since this rank first saw it
        (their process is frozen or gone; an earlier run's leftover record counts like a rank that has not
        started, which a step timer would also end the job for). Judged by this process's clock, so clocks
        of other nodes do not matter; a missing record (not started, or finished: :meth:`close` removes
        it) is not judged."""
        now, limit, frozen = time.monotonic(), max(self.timeout, 3 * self.tick, 5.0), []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                alive = json.loads((self.dir / f"rank-{r}.json").read_text())["alive"]
            except (OSError, ValueError, KeyError, TypeError):
                self._peers.pop(r, None)
                continue
            seen = self._peers.get(r)
            if seen is None or alive != seen[0]:
                self._peers[r] = (alive, now)
            elif now - seen[1] > limit:
                frozen.append(r)
        return frozen

    def verdict(self) -> str:
        """One paragraph: which rank stopped making progress, and what happens now."""
        now, others = time.time(), []
        for r in range(self.world):
            try:
                others.append(json.loads((self.dir / f"rank-{r}.json").read_text()))
            except (OSError, ValueError):
                others.append({"rank": r, "missing": True})
        frozen = [o for o in others if o.get("missing") or now - o.get("alive", 0) > max(3 * self.tick, 5.0)]
        data = [o for o in others if o not in frozen and o.get("phase") == "data"]
        behind = sorted((o for o in others if o not in frozen), key=lambda o: o.get("step", 0))
        idle = round(time.monotonic() - self.last)
        if frozen:
            who = ", ".join(f"rank {o['rank']}" + (f" (pid {o['pid']})" if "pid" in o else "") for o in frozen)
            why = (f"{who} stopped responding (its process is frozen or gone: SIGSTOP, a stuck driver or file "
                   f"system, an out-of-memory kill)")
        elif data:
            who = ", ".join(f"rank {o['rank']}" for o in data)
            why = f"{who} has been waiting for data (a stuck file system or object store?)"
        elif self.world > 1 and behind and behind[0].get("step", 0) < max(o.get("step", 0) for o in behind):
            why = f"rank {behind[0]['rank']} is behind, at step {behind[0].get('step')}"
        else:
            why = "this process made no progress" + (" (no rank stands out)" if self.world > 1 else "")
        return (f"no optimizer step on rank {self.rank} for {idle} s (run.hang_timeout={self.timeout:g}) after step "
                f"{self.step}: {why}. Ending this process so that the job stops instead of hanging; the last "
                f"checkpoint is intact: fix the cause and run the same command again to resume.")
