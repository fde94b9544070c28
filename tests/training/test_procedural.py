"""The procedural data set is deterministic, labelled correctly and holds out its pairs."""

from __future__ import annotations

import numpy as np

from training.data import procedural as P


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a = np.asarray(P.ShapesDataset("test", 3, seed=1)[2][0])
    b = np.asarray(P.ShapesDataset("test", 3, seed=1)[2][0])
    c = np.asarray(P.ShapesDataset("test", 3, seed=2)[2][0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_splits_differ() -> None:
    assert P.sample(0, "train", 5) != P.sample(0, "test", 5)


def test_training_split_never_shows_held_out_pairs_and_test_does() -> None:
    train = [P.sample(0, "train", i) for i in range(3000)]
    test = [P.sample(0, "test", i) for i in range(3000)]
    assert not any((s.colour, s.shape) in P.HELD_OUT for s in train)
    assert {(s.colour, s.shape) for s in test} >= set(P.HELD_OUT)


def test_at_least_40_classes_and_every_class_appears() -> None:
    labels = P.class_labels()
    assert len(labels) == 56 and len(set(labels)) == 56
    seen = {P.sample(0, "test", i).label for i in range(4000)}
    assert seen == set(labels)


def test_shape_is_drawn_in_its_colour_at_its_place() -> None:
    for i in range(20):
        img, spec = P.ShapesDataset("val", 20)[i]
        px = np.asarray(img)[int(spec.cy * 64), int(spec.cx * 64)].astype(int)
        assert np.abs(px - np.array(P.COLOURS[spec.colour])).max() <= 15  # centre pixel: shape colour +- jitter


def test_large_shapes_cover_more_pixels_than_small() -> None:
    def coverage(spec: P.Sample) -> float:
        img = np.asarray(P.render(spec)).astype(int)
        return float((np.abs(img - np.array(P.COLOURS[spec.colour])).max(axis=2) <= 15).mean())

    small = [coverage(s) for s in (P.sample(0, "val", i) for i in range(200)) if s.size == "small"]
    large = [coverage(s) for s in (P.sample(0, "val", i) for i in range(200)) if s.size == "large"]
    assert max(small) < min(large)


def test_captions_name_the_class_and_position_is_right() -> None:
    spec = P.Sample("small", "red", "circle", "white", cx=0.1, cy=0.9, radius=0.1, angle=0, seed=0)
    assert spec.position == "in the bottom left"
    assert spec.caption(P.CAPTION_TEMPLATES[0]) == "a photo of a small red circle."
    assert P.Sample("large", "red", "circle", "white", 0.5, 0.5, 0.3, 0, 0).position == "in the centre"


def test_shapes_command_writes_labelled_files_and_the_label_list(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cli import main

    assert main(["shapes", "--out", str(tmp_path), "--count", "30"]) == 0
    labels = (tmp_path / "labels.txt").read_text().split("\n")[:-1]
    assert labels == P.class_labels()
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 30
    for i, name in enumerate(names):
        spec = P.sample(0, "test", i)
        assert name.startswith(f"{i:04d}_{spec.label.replace(' ', '_')}")
        assert name.endswith("_held-out.png") == P.is_held_out(spec.label)
