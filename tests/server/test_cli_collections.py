"""`tandem index ...` and `tandem search` against a real server: ingest a folder (resumable, with captions and
per-item failures), search with texts and images, contact sheets, recall evaluation, lifecycle and errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from tandem.v1 import tandem_pb2 as pb

import cli
from server import cli as serving
from server.client import TandemClient
from tests.conftest import SHIPPED_MODELS, start_server
from training.data import procedural

N_IMAGES = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # type: ignore[no-untyped-def]
    server = start_server(SHIPPED_MODELS, data_dir=str(tmp_path_factory.mktemp("data")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """12 procedural images in two subfolders, a captions.csv (one image with two captions), and a non-image."""
    root = tmp_path_factory.mktemp("images")
    rows = []
    for i, (img, spec) in enumerate(procedural.ShapesDataset("test", N_IMAGES, seed=3)):
        rel = f"{'left' if i % 2 else 'right'}/{i:02d}.png"
        (root / rel).parent.mkdir(exist_ok=True)
        img.save(root / rel)
        rows.append((rel, f"a {spec.label}"))
    rows.append(("left/01.png", "another caption"))
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    (root / "notes.txt").write_text("not an image, not ingested")
    return root


def tandem(server, capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    rc = cli.main([*argv, "--server", server.target])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def ingested(server, folder) -> str:  # type: ignore[no-untyped-def]
    """The folder ingested into collection "shapes" (the first run is checked in test_ingest_...)."""
    rc = cli.main(["index", "ingest", str(folder), "--collection", "shapes", "--captions",
                   str(folder / "captions.csv"), "--batch", "5", "--create", "--server", server.target])
    assert rc == 0
    return "shapes"


def test_ingest_stores_every_image_with_its_metadata_and_resumes(server, folder, ingested, capsys) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(server.target) as c:
        assert c.get_collection("shapes").count == N_IMAGES
        got = c.get("shapes", ["right/00.png", "left/01.png", "notes.txt"])
    assert got.missing == ["notes.txt"]
    spec = procedural.ShapesDataset("test", N_IMAGES, seed=3)[0][1]
    assert got.items["right/00.png"] == {"path": "right/00.png", "folder": "right", "caption": f"a {spec.label}"}
    assert got.items["left/01.png"]["caption"][1] == "another caption"  # several captions: a list

    args = ["index", "ingest", str(folder), "--collection", "shapes", "--batch", "5"]
    rc, out, _ = tandem(server, capsys, *args)
    assert rc == 0 and f"0 stored, {N_IMAGES} skipped (already stored), 0 failed" in out

    with TandemClient(server.target) as c:  # as if a run had stopped before its last items
        c.delete("shapes", ["left/03.png", "right/10.png", "left/11.png"])
    rc, out, _ = tandem(server, capsys, *args)
    assert rc == 0 and f"3 stored, {N_IMAGES - 3} skipped (already stored), 0 failed; shapes holds 12 items" in out


def test_ingest_reports_each_failed_item(server, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "sub").mkdir()
    procedural.ShapesDataset("test", 1, seed=5)[0][0].save(tmp_path / "sub" / "good.png")
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"junk")
    rc, out, err = tandem(server, capsys, "index", "ingest", str(tmp_path), "--collection", "broken")
    assert rc == 1 and "add --create" in err
    rc, out, _ = tandem(server, capsys, "index", "ingest", str(tmp_path), "--collection", "broken", "--create")
    assert rc == 1 and "1 stored, 0 skipped (already stored), 1 failed" in out
    assert re.search(r"failed sub/broken\.jpg: INVALID_ARGUMENT: .*not a recognisable image", out)
    assert tandem(server, capsys, "index", "drop", "broken")[0] == 0


def test_search_prints_hits_per_query(server, folder, ingested, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = tandem(server, capsys, "search", "a large red circle", "--image", str(folder / "left/05.png"),
                        "--collection", "shapes", "--top-k", "4")
    assert rc == 0
    text, image = out.split("image ")
    assert text.splitlines()[0] == '"a large red circle"'
    hits = re.findall(r"^\s+(\d)\s+(-?\d\.\d{4})\s+(\S+\.png)\s+.*folder=(left|right)", text, re.M)
    assert [h[0] for h in hits] == ["1", "2", "3", "4"] and all((folder / h[2]).is_file() for h in hits)
    assert re.search(r"^\s+1\s+1\.0000\s+left/05\.png", image, re.M)  # an image finds itself first

    rc, out, _ = tandem(server, capsys, "search", "a large red circle", "--collection", "shapes", "--json")
    result = json.loads(out)
    assert result["kind"] == "text" and len(result["hits"]) == 10 and result["hits"][0]["rank"] == 1


def test_contact_sheet_has_a_row_per_query_and_a_column_per_hit(server, folder, ingested, tmp_path, capsys
                                                                ) -> None:  # type: ignore[no-untyped-def]
    thumb, k = 48, 3
    cell_w, cell_h = thumb + 2 * serving.SHEET_PAD, thumb + 2 * serving.SHEET_PAD + 2 * serving.SHEET_LINE
    for root, name in ((folder, "found.png"), (tmp_path / "elsewhere", "missing.png")):
        rc, out, _ = tandem(server, capsys, "search", "a large red circle", "a small blue square", "--image",
                            str(folder / "right/00.png"), "--collection", "shapes", "--top-k", str(k), "--sheet",
                            str(tmp_path / name), "--root", str(root), "--thumb", str(thumb))
        assert rc == 0 and f"3 rows x {1 + k} columns" in out
        sheet = Image.open(tmp_path / name).convert("RGB")
        assert sheet.size == ((1 + k) * cell_w, 3 * cell_h)
        # the middle of every hit's thumbnail: a picture when the file is there, the grey box when it is not
        centres = [sheet.getpixel((col * cell_w + cell_w // 2, row * cell_h + serving.SHEET_PAD + thumb // 2))
                   for row in range(3) for col in range(1, 1 + k)]
        grey = [c == serving.MISSING_GREY for c in centres]
        assert not any(grey) if name == "found.png" else all(grey)


def test_eval_of_a_flat_index_has_full_recall(server, folder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert tandem(server, capsys, "index", "create", "flat", "--index-spec", "Flat")[0] == 0
    assert tandem(server, capsys, "index", "ingest", str(folder), "--collection", "flat")[0] == 0
    rc, out, _ = tandem(server, capsys, "index", "eval", "--collection", "flat", "--k", "5")
    assert rc == 0, out
    assert re.search(r"^index \(exact=False\)\s+1\.000\s+\d", out, re.M)
    assert f"queries: {N_IMAGES} stored items' own vectors" in out and "below full recall: 0 of 12" in out

    ids = tmp_path / "ids.txt"
    ids.write_text("left/01.png\nright/02.png\nghost\n")
    rc, out, err = tandem(server, capsys, "index", "eval", "--collection", "flat", "--ids-file", str(ids), "--json")
    result = json.loads(out)
    assert rc == 0 and result["queries"] == 2 and result["recall@10"] == 1.0 and "1 ids" in err


def test_create_list_describe_rebuild_drop(server, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = tandem(server, capsys, "index", "create", "temp", "--metric", "l2")
    assert rc == 0 and out.startswith("created temp: tandem-shapes/1, dim 64, l2")
    rc, out, _ = tandem(server, capsys, "index", "list")
    assert rc == 0 and re.search(r"^temp\s+tandem-shapes/1\s+64\s+l2\s+Flat \(auto\)\s+0\s+ok$", out, re.M)
    rc, out, _ = tandem(server, capsys, "index", "describe", "temp")
    fields = [f.name for f in pb.CollectionInfo.DESCRIPTOR.fields]
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == fields
    assert re.search(r"^model\s+tandem-shapes/1$", out, re.M) and re.search(r"^model_loaded\s+yes\s", out, re.M)
    rc, out, _ = tandem(server, capsys, "index", "describe", "temp", "--json")
    assert set(json.loads(out)) == set(fields)
    assert tandem(server, capsys, "index", "rebuild", "temp")[1].startswith("rebuilt temp:")
    rc, out, _ = tandem(server, capsys, "index", "drop", "temp")
    assert rc == 0 and out == "dropped temp\n"
    rc, _, err = tandem(server, capsys, "index", "describe", "temp")
    assert rc == 1 and err.startswith("error: NOT_FOUND: collection 'temp' does not exist")
    rc, _, err = tandem(server, capsys, "index", "create", "bad/name")
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: ")


def test_a_bad_filter_is_invalid_argument(server, ingested, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = tandem(server, capsys, "search", "x", "--collection", "shapes", "--filter", "colour = ")
    assert rc == 1 and out == "" and err.startswith("error: INVALID_ARGUMENT: ")
    rc, out, _ = tandem(server, capsys, "search", "x", "--collection", "shapes", "--top-k", "3", "--filter",
                        'folder = "left" and exists caption')
    assert rc == 0 and len(re.findall(r"folder=left", out)) == 3 and "folder=right" not in out


@pytest.mark.parametrize("command", [["search"], ["index"], ["index", "create"], ["index", "list"],
                                     ["index", "describe"], ["index", "drop"], ["index", "rebuild"],
                                     ["index", "ingest"], ["index", "eval"]])
def test_every_command_explains_itself(command, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0 and "examples:\n  tandem " in capsys.readouterr().out


def test_a_folder_or_an_unwritable_path_is_a_readable_error_not_a_traceback(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """An unreadable file, a folder given as an image, or an output that cannot be written raised a traceback."""
    from cli import main

    assert main(["embed", str(tmp_path), "--server", "127.0.0.1:9"]) == 2  # no server needed: read first
    assert "Is a directory" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file where a folder is needed")
    assert main(["embed", "--text", "x", "--output", str(tmp_path / "taken" / "x.npy"),
                 "--server", "127.0.0.1:9"]) in (1, 2)  # 1 if the server is asked first: no traceback either way
    assert "Traceback" not in capsys.readouterr().err
