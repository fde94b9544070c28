"""Training reads image files through the server's decoder: EXIF orientation included."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bundle.image import load_image
from tests.conftest import png_bytes
from training.data.captions import FolderCaptions
from training.data.images import FolderImages


def rotated_jpeg(path: Path) -> None:
    """A 40x20 JPEG whose EXIF says: show it rotated 90 degrees clockwise (so 20x40, white on top)."""
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(png_bytes(img, "JPEG", exif=exif.tobytes()))


def test_image_folders_apply_exif_orientation(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    rotated_jpeg(tmp_path / "cats" / "1.jpg")
    img, label = FolderImages(tmp_path, transform=lambda im: im)[0]
    assert img.size == (20, 40) and img.mode == "RGB" and label == 0
    assert img.getpixel((10, 5))[0] > 200  # white half on top, as a photo viewer shows it


def test_caption_folders_see_the_pixels_the_server_sees(tmp_path: Path) -> None:
    rotated_jpeg(tmp_path / "a.jpg")
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,a white square over a black one\n")
    img, caption = FolderCaptions(tmp_path, transform=lambda im: im)[0]
    assert img.size == (20, 40) and caption.startswith("a white square")
    assert list(img.getdata()) == list(load_image(tmp_path / "a.jpg").getdata())
