"""webdataset tar shards, as img2dataset and open_clip write them: streamed, shuffled, split per rank and worker.

    --data 'data/{00000..00099}.tar'     brace-expanded shard names (anything webdataset opens: paths, pipe:...)

A sample is the files of one tar that share a key (`000123.jpg`, `000123.txt`, `000123.json`): an image
(jpg, jpeg, png or webp) and, for CLIP, a caption from `txt`, else from `json`'s "caption". An integer `cls`, when present, is kept as the
sample's label (-1 otherwise); nothing trains on it.

Streaming, so the data may be larger than memory and disk cache: nothing is indexed or cached. Per epoch:

1. the shard list is shuffled by (seed, epoch), the same order on every rank;
2. `webdataset.split_by_node` gives each torchrun rank every world_size-th shard, and
   `webdataset.split_by_worker` each DataLoader worker of that rank every workers-th of those;
3. each worker reads its shards' samples through a shuffle buffer seeded by (seed, epoch, rank, worker),
   skips the samples a resumed run already trained on (see below), then decodes and batches.

Decoding is the server's (`bundle.image.load_rgb` / `load_image`: EXIF orientation applied). A sample whose
image does not decode, that has no image or no caption, or a tar member that cannot be read is skipped and
counted, never fatal: every batch carries how many samples were skipped while it was filled, and the trainer
shows the total in the progress bar and the log.

Resume mid-epoch: every batch also carries (epoch, worker, samples taken out of the shuffle buffer so far).
A rank's stream is a pure function of (seed, epoch, rank, worker count), so the checkpoint records, per rank,
the epoch and each worker's count; a resumed run replays the same streams and skips that many raw samples
per worker before decoding (cheap: tar reading only) and continues where it stopped. With another world size
or worker count the streams differ: the run then restarts the recorded epoch from its beginning (logged).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from bundle.image import ImageInputError, load_image, load_rgb

log = logging.getLogger("tandem.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def is_shards(data: str) -> bool:
    """Whether --data names webdataset shards rather than "shapes" or a folder."""
    return ".tar" in data


@dataclass
class Position:
    """Where one worker's stream stood when it finished a batch; `skipped`: samples dropped while filling it."""

    epoch: int
    worker: int
    taken: int  # samples taken out of the shuffle buffer this epoch, skipped ones included
    skipped: int


@dataclass
class StreamState:
    """This rank's place in its data stream: what a checkpoint records to resume mid-epoch."""

    epoch: int = 0
    taken: dict[int, int] = field(default_factory=dict)  # worker -> samples taken this epoch
    workers: int = 0
    world_size: int = 1
    skipped: int = 0  # corrupt samples skipped so far (whole run)

    def to_dict(self) -> dict[str, Any]:  # plain data: checkpoints load with weights_only=True
        return {"epoch": self.epoch, "taken": {str(k): v for k, v in self.taken.items()}, "workers": self.workers,
                "world_size": self.world_size, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        return cls(d["epoch"], {int(k): v for k, v in d["taken"].items()}, d["workers"], d["world_size"],
                   d.get("skipped", 0))


class Shards(torch.utils.data.IterableDataset):
    """Decoded samples of webdataset shards, each tagged with its stream Position: (item, Position).

    `decode(sample dict) -> item or None` (None: skip and count). Set `epoch` and `resume_taken` (worker ->
    samples to skip) before each pass; the trainer does.
    """

    def __init__(self, urls: str, decode: Callable[[dict[str, Any]], Any | None], seed: int = 0,
                 shuffle_buffer: int = 1_000):
        self.urls = urls
        self.shards = list(wds.shardlists.expand_urls(urls))
        if not self.shards:
            raise ValueError(f"{urls}: no shards")
        self.decode, self.seed, self.shuffle_buffer = decode, seed, shuffle_buffer
        self.epoch = 0
        self.resume_taken: dict[int, int] = {}

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[tuple[Any, Position]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rank, _, _, _ = wds.utils.pytorch_worker_info()
        unreadable = [0]

        def count_and_continue(exn: Exception) -> bool:
            unreadable[0] += 1
            log.warning("skipping unreadable shard data: %r", exn)
            return True

        stream = wds.DataPipeline(
            wds.SimpleShardList(self.shard_order(self.epoch)),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=count_and_continue),
            wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer),
                        rng=random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")),
        )
        skip = self.resume_taken.get(worker, 0)
        taken = 0
        for sample in stream:
            taken += 1
            if taken <= skip:
                continue
            item = self.decode(sample)
            if item is None:
                unreadable[0] += 1
                continue
            yield item, Position(self.epoch, worker, taken, unreadable[0])
            unreadable[0] = 0


def sample_image(sample: dict[str, Any], rgb: bool = True) -> Image.Image | None:
    """The sample's image as the server decodes it, or None (logged) when it has none or it does not decode."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        log.warning("%s: no image (%s) in sample %s", sample.get("__url__"), "/".join(IMAGE_KEYS),
                    sample.get("__key__"))
        return None
    try:
        return load_rgb(sample[key]) if rgb else load_image(sample[key])
    except ImageInputError as e:
        log.warning("%s: skipping %s.%s: %s", sample.get("__url__"), sample.get("__key__"), key, e)
        return None


def sample_caption(sample: dict[str, Any]) -> str | None:
    """The caption from `txt`, else the "caption" of `json`; None when there is neither."""
    import json

    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str):
            return caption
    log.warning("%s: skipping %s: no caption (txt, or json with \"caption\")", sample.get("__url__"),
                sample.get("__key__"))
    return None


class ShardImages(Shards):
    """(transform(image), label) per sample, label from `cls` or -1: the self-supervised methods' data."""

    def __init__(self, urls: str, transform: Callable[[Image.Image], Any], seed: int = 0,
                 shuffle_buffer: int = 1_000):
        self.transform = transform
        super().__init__(urls, self._item, seed, shuffle_buffer)

    def _item(self, sample: dict[str, Any]) -> tuple[Any, int] | None:
        image = sample_image(sample)
        if image is None:
            return None
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError:
            label = -1
        return self.transform(image), label


class ShardCaptions(Shards):
    """(transform(image), caption) per sample: CLIP's data."""

    def __init__(self, urls: str, transform: Callable[[Image.Image], Any], seed: int = 0,
                 shuffle_buffer: int = 1_000):
        self.transform = transform
        super().__init__(urls, self._item, seed, shuffle_buffer)

    def _item(self, sample: dict[str, Any]) -> tuple[Any, str] | None:
        caption = sample_caption(sample)
        image = sample_image(sample, rgb=False) if caption is not None else None
        return None if image is None else (self.transform(image), caption)
