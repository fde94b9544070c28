"""webdataset shards: several workers, each rank its own shards, corrupt samples skipped and counted, and a
resumed run continuing mid-epoch exactly where the stream stopped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import CONFIGS
from tests.training.shard_data import write_shards
from training.config import ClipConfig, TrainConfig
from training.data.shards import ShardCaptions, Shards, is_shards
from training.distributed import Dist
from training.methods.clip import Clip
from training.trainer import Batches, Trainer


def keys(sample: dict) -> str:  # type: ignore[type-arg]
    return sample["__key__"]


def key_batches(urls: str, workers: int, batch: int = 4, epoch: int = 0, resume: dict[int, int] | None = None,
                shuffle_buffer: int = 8) -> list[tuple[list[str], dict]]:  # type: ignore[type-arg]
    """One epoch of (sample keys, batch info) as the trainer's DataLoader delivers them."""
    data = Shards(urls, keys, seed=3, shuffle_buffer=shuffle_buffer)
    data.epoch, data.resume_taken = epoch, resume or {}
    loader = DataLoader(data, batch_size=batch, drop_last=True, num_workers=workers,
                        collate_fn=Batches(list, tagged=True))
    return list(loader)


def test_brace_patterns_are_shards() -> None:
    assert is_shards("data/{00000..00099}.tar") and is_shards("/x/a.tar")
    assert not is_shards("shapes") and not is_shards("photos/")


def test_two_workers_read_every_sample_once_per_epoch_shuffled(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, shards=4, per_shard=8, corrupt=None)
    batches = key_batches(urls, workers=2, batch=4)
    seen = [k for ks, _ in batches for k in ks]
    assert sorted(seen) == sorted(f"{s:06d}_{i:04d}" for s in range(4) for i in range(8))
    assert {info["position"].worker for _, info in batches} == {0, 1}
    assert seen != sorted(seen)  # shards and samples are shuffled
    again = [k for ks, _ in key_batches(urls, workers=2, batch=4, epoch=1) for k in ks]
    assert sorted(again) == sorted(seen) and again != seen  # another epoch, another order


def test_each_rank_reads_its_own_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """webdataset.split_by_node under torchrun's RANK/WORLD_SIZE: disjoint halves that cover the data."""
    urls = write_shards(tmp_path, shards=4, per_shard=4, corrupt=None)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append({k for ks, _ in key_batches(urls, workers=0, batch=2) for k in ks})
    assert per_rank[0].isdisjoint(per_rank[1])
    assert len(per_rank[0] | per_rank[1]) == 16
    assert all(len({k[:6] for k in ks}) == 2 for ks in per_rank)  # two whole shards each


def test_resume_continues_each_worker_stream_where_it_stopped(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, shards=4, per_shard=8, corrupt=None)
    full = key_batches(urls, workers=2, batch=4)
    stop = 3  # batches trained before the "crash"; the checkpoint holds each worker's last position
    taken: dict[int, int] = {}
    for _, info in full[:stop]:
        taken[info["position"].worker] = info["position"].taken
    resumed = key_batches(urls, workers=2, batch=4, resume=taken)

    def by_worker(batches: list) -> dict[int, list[list[str]]]:  # type: ignore[type-arg]
        out: dict[int, list[list[str]]] = {}
        for ks, info in batches:
            out.setdefault(info["position"].worker, []).append(ks)
        return out

    # Each worker goes on with the very batches it would have made; only the round-robin between the
    # two workers restarts at worker 0.
    assert by_worker(resumed) == by_worker(full[stop:])
    assert len(resumed) == len(full) - stop


def test_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, shards=2, per_shard=8, corrupt="000001_0003")
    method = Clip(ClipConfig(model=str(CONFIGS / "tiny-vit.json"), data=urls), Dist())
    data = method.dataset()
    assert isinstance(data, ShardCaptions)
    loader = DataLoader(data, batch_size=5, drop_last=False, num_workers=2, collate_fn=Batches(list, tagged=True))
    items = [item for batch, _ in loader for item in batch]
    skipped = sum(info["skipped"] for _, info in loader)
    assert len(items) == 15 and skipped == 1  # txt and json captions, jpg and png images
    image, caption = items[0]
    assert image.shape == (3, 32, 32) and caption.startswith("a ")


def test_clip_trains_on_shards_resumes_mid_epoch_and_logs_the_skipped(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    urls = write_shards(tmp_path / "shards", shards=4, per_shard=8, corrupt="000001_0003")
    out = tmp_path / "run"

    def run(steps: int) -> dict:  # type: ignore[type-arg]
        config = ClipConfig(model=str(CONFIGS / "tiny-vit.json"), data=urls, steps=steps, batch_size=4)
        loop = TrainConfig.for_run(config, out=str(out), workers=2, checkpoint_every=2, eval_every=100,
                                   progress=False)
        Trainer(Clip(config, Dist()), loop, Dist()).fit()
        return torch.load(out / "checkpoints" / "latest.pt", weights_only=True)

    with caplog.at_level(logging.INFO, logger="tandem.train"):
        first = run(4)
    stream = first["streams"][0]
    assert stream["epoch"] == 0 and sum(stream["taken"].values()) >= 16  # 4 batches of 4 from 2 workers
    second = run(6)  # resumes at step 4, in the same epoch
    resumed = second["streams"][0]
    assert second["step"] == 6 and resumed["epoch"] == 0
    assert all(resumed["taken"][w] > stream["taken"][w] for w in stream["taken"])  # onwards, not from 0
    with caplog.at_level(logging.INFO, logger="tandem.train"):
        third = run(10)  # the epoch ends (31 good samples), the corrupt one was met on the way
    assert third["streams"][0]["skipped"] == 1
    assert any("1 corrupt samples skipped" in r.getMessage() for r in caplog.records)
    assert any(r.get("skipped_samples") == 1.0 for r in third["history"])
