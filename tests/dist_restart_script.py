"""Run by tests/test_distributed_restart.py under ``torchrun --nproc-per-node 2 --max-restarts 1``; not a test itself.

``python dist_restart_script.py OUT_DIR``. Every attempt fits a two-stage net with ``method="partial"`` in
``OUT_DIR/killed``. On the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0) rank 1 SIGKILLs itself in
the middle of stage 2's second epoch, after writing the mtimes of every stored feature and finished
stage file. torchrun then tears the group down and starts it again (attempt 1), which must finish the
same fit from what the first attempt left; then, as a reference, both ranks fit the same net from
nothing, uninterrupted, in ``OUT_DIR/reference``. Rank 0 writes both models' weights, the reports and each
probe's forward counts of the restarted fit to ``OUT_DIR/result.pt``.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time

import torch
from torch import nn

import pystage
from pystage import distributed
from pystage.models import with_splits
from pystage.store import FeatureStore

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
ROWS, BATCH, EPOCHS = 400, 50, 2
STEPS = ROWS // BATCH  # global batches per epoch (each rank steps through every one)
KILL_AT = STEPS + STEPS // 2  # stage 2's training forward at which rank 1 dies: mid second epoch
COUNTS: dict[str, int] = {}  # "<probe>/<train|other>" -> batches through it in this fit, this process
KILL = {"armed": False, "snapshot": ""}


class Probe(nn.Module):
    """Identity that counts the batches through it: training steps, and the rest (store builds, evaluation).

    ``fit``'s one-sample checks of the model (shape and class count) are not counted: they are no work."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1:
            return x
        mode = "train" if self.training and torch.is_grad_enabled() else "other"
        key = f"{self.name}/{mode}"
        COUNTS[key] = COUNTS.get(key, 0) + 1
        if KILL["armed"] and key == "2/train" and COUNTS[key] == KILL_AT:
            with open(KILL["snapshot"], "w") as f:
                json.dump(_mtimes(os.path.dirname(KILL["snapshot"]) + "/killed"), f)
            os.kill(os.getpid(), signal.SIGKILL)  # what a lost GPU or node does to a rank: no cleanup at all
        return x


def _mtimes(root: str) -> dict[str, int]:
    """mtime (ns) of every feature file, shard manifest and finished stage file under ``root``."""
    paths = glob.glob(os.path.join(root, "features", "*")) + glob.glob(os.path.join(root, "stages", "*.pt"))
    return {os.path.relpath(p, root): os.stat(p).st_mtime_ns for p in sorted(paths)
            if not p.endswith(".progress.pt") and not os.path.basename(p).startswith(".")}


def _fit(root: str) -> pystage.FitResult:
    COUNTS.clear()
    torch.manual_seed(0)
    net = nn.Sequential(Probe("1"), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        Probe("2"), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    train = pystage.data.synthetic(n=ROWS, shape=(3, 8, 8), seed=0, split="train")
    val = pystage.data.synthetic(n=100, shape=(3, 8, 8), seed=0, split="val")
    return pystage.fit(with_splits(net, [4]), train, val, method="partial", epochs=EPOCHS, batch_size=BATCH,
                       seed=0, progress=False, store_dtype=torch.float32, store=FeatureStore(root),
                       checkpoint_dir=os.path.join(root, "stages"))


def main(out: str) -> None:
    torch.set_num_threads(1)
    # Join the group first thing, as a training script would: a restarted group joins while torchrun's store
    # still holds the killed group's addresses (distributed.init keeps each restart's keys apart).
    distributed.init(torch.device("cpu"))
    with open(os.path.join(out, f"attempt{ATTEMPT}-rank{RANK}"), "w") as f:
        f.write(f"{time.time()}\n")
    KILL.update(armed=ATTEMPT == 0 and RANK == 1, snapshot=os.path.join(out, "before-kill.json"))
    killed = _fit(os.path.join(out, "killed"))
    counts = dict(COUNTS)
    KILL["armed"] = False
    reference = _fit(os.path.join(out, "reference"))
    if RANK == 0:
        torch.save({"attempt": ATTEMPT, "state": killed.model.state_dict(), "report": killed.report.to_dict(),
                    "counts": counts, "reference": reference.model.state_dict(),
                    "reference_report": reference.report.to_dict(), "after": _mtimes(os.path.join(out, "killed"))},
                   os.path.join(out, "result.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
