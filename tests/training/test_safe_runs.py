"""Safe runs: crash-safe checkpoints (latest.pt without hard links, keep-N pruning, weights_only resume), and
distributed runs that fail cleanly: two gloo processes on the CPU where one rank's loss turns NaN, or rank 0
fails while evaluating, must both stop with an error instead of one waiting for the other."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import checkpoints
from training.config import SimCLRConfig, TrainConfig
from training.distributed import Dist
from training.methods.simclr import SimCLR
from training.trainer import Trainer


def tiny(out: Path, steps: int = 4, **loop: object) -> tuple[SimCLR, TrainConfig]:
    config = SimCLRConfig(backbone="resnet-micro", image_size=16, hidden_dim=32, out_dim=16, batch_size=8,
                          train_size=32, eval_bank_size=32, val_size=16, test_size=16, steps=steps)
    return SimCLR(config), TrainConfig.for_run(config, out=str(out), progress=False, **loop)  # type: ignore[arg-type]


def test_checkpoints_are_pruned_to_the_newest_and_resume_loads_tensors_only(tmp_path: Path) -> None:
    method, loop = tiny(tmp_path, steps=5, checkpoint_every=1, eval_every=100, keep_checkpoints=2)
    Trainer(method, loop, Dist()).fit()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_0000004.pt", "step_0000005.pt"]
    state = checkpoints.load(folder / "latest.pt")  # weights_only=True: no pickled objects
    assert state["step"] == 5 and state["train_config"]["keep_checkpoints"] == 2
    assert os.path.samefile(folder / "latest.pt", folder / "step_0000005.pt")  # a hard link where possible


def test_latest_is_a_copy_where_the_filesystem_has_no_hard_links(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(*args: object, **kw: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # what FAT, some FUSE and SMB mounts answer

    monkeypatch.setattr(os, "link", no_links)
    method, loop = tiny(tmp_path, steps=2, checkpoint_every=1, eval_every=100)
    Trainer(method, loop, Dist()).fit()
    folder = tmp_path / "checkpoints"
    latest, newest = folder / "latest.pt", folder / "step_0000002.pt"
    assert not os.path.samefile(latest, newest) and latest.read_bytes() == newest.read_bytes()
    assert not list(folder.glob("*.tmp"))  # no temporary file left behind
    resumed, loop = tiny(tmp_path, steps=3, checkpoint_every=1, eval_every=100)
    trainer = Trainer(resumed, loop, Dist())
    assert trainer.maybe_resume() and trainer.step == 2


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "step_0000001.pt"
    checkpoints.atomic_save({"step": 1}, path)

    def disk_full(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoints.atomic_save({"step": 2}, path)
    assert checkpoints.load(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]


# -- two gloo processes --------------------------------------------------------------------------------------
class NaNOnRank1(SimCLR):
    """SimCLR whose loss becomes NaN on rank 1 at its third step (fault injection)."""

    def ssl_loss(self, views):  # type: ignore[no-untyped-def]
        loss, features = super().ssl_loss(views)
        if self.dist.rank == 1 and self._progress[0] == 2:
            loss = loss * float("nan")
        return loss, features


class EvalFailsOnRank0(SimCLR):
    def evaluate(self, split: str) -> dict[str, float]:
        raise RuntimeError("evaluation broke on rank 0 (injected)")


def _rank(rank: int, init_file: str, out: str, kind: str, results: mp.Queue) -> None:  # type: ignore[type-arg]
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import datetime as dt

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=dt.timedelta(seconds=60))
    cls = {"nan": NaNOnRank1, "eval": EvalFailsOnRank0}[kind]
    method, loop = tiny(Path(out), steps=4, eval_every=2, checkpoint_every=100)
    method = cls(method.config, Dist(rank, 2, 0, torch.device("cpu")))
    try:
        Trainer(method, loop, method.dist).fit()
        results.put((rank, "finished"))
    except Exception as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
        traceback.print_exc()
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, kind: str) -> dict[int, str]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), str(tmp_path / "run"), kind, results))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=150) for _ in procs)  # a rank left hanging would time out here
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return out


def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    out = run_two_ranks(tmp_path, "nan")
    assert out[0].startswith("FloatingPointError") and out[1].startswith("FloatingPointError"), out
    assert "step 2" in out[0] and "non-finite" in out[1]


def test_rank_0_failing_to_evaluate_stops_the_other_rank(tmp_path: Path) -> None:
    out = run_two_ranks(tmp_path, "eval")
    assert out[0] == "RuntimeError: evaluation broke on rank 0 (injected)", out
    assert out[1].startswith("RuntimeError: rank 0 failed while evaluating"), out
