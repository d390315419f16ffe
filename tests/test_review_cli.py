"""`medseg predict` and the Python API as a new user meets them: the file's pixel size, what an
output folder holds when nothing could be segmented, and messages for the user's mistakes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tifffile

from hostile import assert_refused, medseg
from napari_medseg.inference import Segmenter, TileSettings, segment_file
from napari_medseg.io import read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def at_40x(segmenter) -> Segmenter:
    """The tiny test model, told it was trained at 0.25 µm/px."""
    return Segmenter(segmenter.model, replace(segmenter.meta, pixel_size_um=0.25), segmenter.device)


def test_segment_file_uses_the_pixel_size_the_file_records(at_40x, consep, tmp_path):
    """A 20x TIFF (0.5 µm/px in its resolution tags) through ``segment_file`` is segmented at the
    model's pixel size, as ``medseg predict`` segments it (it had been taken as 40x)."""
    image = read_image(consep / "images" / "train_2_006.png")
    path = tmp_path / "half.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    settings = TileSettings(128, 32)
    expected = at_40x.segment(image, settings, pixel_size_um=0.5)
    labels = segment_file(path, at_40x, settings)
    assert any("resampled x2" in note for note in at_40x.last_report.notes), at_40x.last_report.notes
    assert labels.shape == image.shape[:2] and np.array_equal(labels, expected)
    # told otherwise, the caller wins
    assert np.array_equal(segment_file(path, at_40x, settings, pixel_size_um=0.25), at_40x.segment(image, settings))


def test_a_run_that_reads_no_file_leaves_no_output_folder(tmp_path, tiny_checkpoint):
    """Every input unreadable: nothing is written, not even classes.json (a folder holding only it
    had been left), and the last line does not name a labels folder that was never made."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(np.zeros(8, np.uint8).tobytes())
    out = tmp_path / "out"
    proc = medseg("predict", text, cut, "--model", tiny_checkpoint, "--out", out, "--device", "cpu")
    assert_refused(proc, "skipped", "'notes.txt'", "'cut.png'")
    assert "none of the 2 files could be read" in proc.stdout and str(out / "labels") not in proc.stdout
    assert not out.exists()


def test_a_readable_file_after_an_unreadable_one_gets_its_classes(tmp_path, tiny_checkpoint, consep):
    """classes.json, written with the first result, is there when the first file is unreadable."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = tmp_path / "out"
    proc = medseg("predict", text, consep / "images" / "train_2_006.png", "--model", tiny_checkpoint, "--out", out,
                  "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert proc.returncode == 1 and "wrote 1 class map to" in proc.stdout
    assert (out / "classes.json").is_file() and (out / "labels" / "train_2_006.tif").is_file()


def test_missing_input_and_empty_folder_are_user_errors(tmp_path):
    """Exit 2 and 'medseg predict: error: ...', as every other mistake of the user (exit 1 and a
    bare 'medseg: ...' before), and nothing written."""
    (tmp_path / "nothing").mkdir()
    out = tmp_path / "out"
    for given, words in ((tmp_path / "missing.png", "does not exist"), (tmp_path / "nothing", "no images")):
        proc = medseg("predict", given, "--out", out)
        assert proc.returncode == 2 and f"medseg predict: error: " in proc.stderr, proc.stderr
        assert_refused(proc, words)
    assert not out.exists()


def test_a_file_given_twice_is_segmented_once(tmp_path, tiny_checkpoint, consep):
    """The same image named twice (and through its folder) is one result, said as one."""
    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "train_2_006.png"
    image.write_bytes((consep / "images" / "train_2_006.png").read_bytes())
    out = tmp_path / "out"
    proc = medseg("predict", image, image, folder, "--model", tiny_checkpoint, "--out", out, "--device", "cpu",
                  "--tile", "128", "--overlap", "32")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 class map to" in proc.stdout and proc.stderr.count("train_2_006.png [") >= 1
    assert "[1/1]" in proc.stderr and "[2/" not in proc.stderr


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder that cannot be written, for root too (permissions alone do not stop root): the
    writability check sees it refused, as on a read-only mount."""
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.realpath(p) == str(folder.resolve())
                        and mode & os.W_OK else real_access(p, mode, **kw))
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("where", ["ro", "ro/sub"])
def test_an_unwritable_output_folder_is_named_before_any_work(read_only_folder, tiny_checkpoint, consep, where):
    """One message naming the folder given (it had named a hidden temp file in it: '.classes.json.
    <host>-<pid>.<hex>.part: Read-only file system'), exit 2, nothing written; slides alike (each
    slide had been 'skipped' for it, exit 1)."""
    from conftest import DATA

    out = read_only_folder.parent / where
    images = medseg("predict", consep / "images" / "train_2_006.png", "--model", tiny_checkpoint, "--out", out,
                    "--device", "cpu")
    slide = medseg("predict", DATA / "slides" / "CMU-1-Small-Region.svs", "--region", "600,500,64,64",
                   "--model", tiny_checkpoint, "--out", out, "--device", "cpu")
    for proc in (images, slide):
        assert proc.returncode == 2, proc.stderr
        assert_refused(proc, f"Cannot write {out}:", "choose a folder you can write to")
        assert ".part" not in proc.stderr and "skipped" not in proc.stderr
    assert list(read_only_folder.iterdir()) == []


def test_a_region_without_width_is_refused_once(tmp_path, tiny_checkpoint):
    """--region with a width or height under 1: one message, exit 2, before the model loads (it had
    been each slide 'skipped' as 'not on the slide')."""
    from conftest import DATA

    proc = medseg("predict", DATA / "slides" / "CMU-1-Small-Region.svs", "--region", "0,0,-5,10",
                  "--model", tiny_checkpoint, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert_refused(proc, "width and height must be at least 1")
    assert not (tmp_path / "out").exists()


def test_a_slide_run_prints_its_region_as_given(tmp_path, tiny_checkpoint):
    """The region as x,y,w,h (clipped to the slide), not a Python repr ('Region(x=..., ...)')."""
    from conftest import DATA

    proc = medseg("predict", DATA / "slides" / "CMU-1-Small-Region.svs", "--region", "2150,500,128,64",
                  "--model", tiny_checkpoint, "--out", tmp_path / "out", "--device", "cpu", "--no-instances")
    assert proc.returncode == 0, proc.stderr
    assert "CMU-1-Small-Region.svs: region 2150,500,70,64," in proc.stdout and "Region(" not in proc.stdout


def test_a_slide_run_that_fills_the_disk_leaves_nothing_and_names_the_folder(tmp_path, tiny_checkpoint, monkeypatch):
    """A full disk while the model's blocks are written: zarr writes a block's chunks at once and
    raises the first failure while the others still run; one of them had made the run's hidden
    store again after the clean-up removed it. Now nothing is left, and the message names the
    results folder (it had been a bare '[Errno 28] No space left on device'); the run stops."""
    import asyncio
    import errno

    from zarr.storage import LocalStore

    from conftest import DATA

    real_set = LocalStore._set

    async def full_disk(self, key, value, exclusive=False):
        if key.startswith("classes/0/") and not key.endswith(".zarray"):
            if key.endswith("0.0"):
                raise OSError(errno.ENOSPC, "No space left on device")
            await asyncio.sleep(0.3)  # the other chunks of the block land after the failure
        return await real_set(self, key, value, exclusive)

    monkeypatch.setattr(LocalStore, "_set", full_disk)
    out = tmp_path / "out"
    proc = medseg("predict", DATA / "slides" / "CMU-1-Small-Region.svs", "--region", "900,900,256,256",
                  "--model", tiny_checkpoint, "--out", out, "--device", "cpu", "--no-instances")
    asyncio.run(asyncio.sleep(0.6))  # any write still under way has landed
    assert proc.returncode == 2
    assert_refused(proc, f"Cannot write {out}: No space left on device")
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_the_python_api_refuses_a_pixel_size_no_microscope_gives(at_40x, consep):
    """``Segmenter.segment(..., pixel_size_um=100)``: refused at once, as --pixel-size 100 is (it
    had upscaled the image 400-fold: 21 s for an 8 x 8 px crop with the default model); the
    plausible range's ends still run."""
    from napari_medseg.inference.rescale import PixelSizeError

    image = read_image(consep / "images" / "train_2_006.png")[:64, :64]
    for size in (100, 25, 0.01):
        with pytest.raises(PixelSizeError, match="not one a microscope gives"):
            at_40x.segment(image, pixel_size_um=size)
        with pytest.raises(PixelSizeError, match="not one a microscope gives"):
            at_40x.segment_nuclei(image, pixel_size_um=size)
    assert at_40x.segment(image[:16, :16], pixel_size_um=1.1).shape == (16, 16)  # 10x: the coarsest taken
    assert at_40x.segment(image, pixel_size_um=0.05).shape == (64, 64)
    assert at_40x.segment(image, pixel_size_um=None).shape == (64, 64)


def test_a_magnification_given_as_the_pixel_size_is_refused_at_once(at_40x, consep, tmp_path, tiny_checkpoint):
    """20, 10 or 5 typed for a pixel size (the magnification) had passed as µm/px and enlarged a
    512² crop 80-fold for a 40x model: 441004 tiles, a run that looked hung. Refused before the
    first tile, naming the magnification; the CLI says the same and writes nothing."""
    from napari_medseg.inference.rescale import PixelSizeError

    image = read_image(consep / "images" / "train_2_006.png")[:64, :64]
    for size, scan in ((20, "0.5"), (10, "1"), (5, "2")):
        started = []
        with pytest.raises(PixelSizeError, match=f"Was {size} the magnification\\? A {size}x scan is about {scan} µm/px"):
            at_40x.segment_nuclei(image, pixel_size_um=size, progress=lambda done, total: started.append(done))
        assert not started
    with pytest.raises(PixelSizeError, match="6x coarser than the model's 0.25 µm/px") as refused:
        at_40x.segment(image, pixel_size_um=1.6)
    assert "Was 1.6" not in str(refused.value)
    from napari_medseg.models import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    save_checkpoint(tmp_path / "at40x.safetensors", model, replace(meta, pixel_size_um=0.25))
    tifffile.imwrite(tmp_path / "tile.tif", image)
    proc = medseg("predict", tmp_path / "tile.tif", "--model", tmp_path / "at40x.safetensors", "--out", tmp_path / "out",
                  "--pixel-size", "20")
    assert_refused(proc, "Was 20 the magnification?")
    assert not (tmp_path / "out").exists()


def test_every_argument_of_every_command_says_what_it_is():
    """``medseg CMD --help`` explains each argument (info's model, convert's folders, train's config,
    the tuning commands' --device had none), and the top help is plain text (no ``)."""
    import argparse

    from napari_medseg.cli import build_parser

    parser = build_parser()
    assert "``" not in parser.format_help() and "browser front" in parser.format_help()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
              if not isinstance(action, argparse._HelpAction) and not action.help]
    assert silent == []


def test_a_resampled_run_says_so_without_a_glass_count_of_zero(tmp_path, consep):
    """The note of a resampled file stands alone ('0/25 tiles skipped as glass; resampled x2 ...' had
    led every note, glass or not)."""
    out = tmp_path / "out"
    proc = medseg("predict", consep / "images" / "train_2_006.png", "--out", out, "--pixel-size", "0.5")  # a 40x model
    assert proc.returncode == 0, proc.stderr
    note = next(line for line in proc.stderr.splitlines() if "train_2_006.png: " in line and "resampled" in line)
    assert note.strip().startswith("train_2_006.png: resampled x") and "skipped as glass" not in note, note


def test_a_resampled_colour_image_with_glass_is_not_called_gray(at_40x, monuseg):
    """A 20x colour image whose right part is glass: the block of glass alone, seen by the network
    at 40x, had added 'the image is gray ...' (and a black border 'dark background') to the run's
    notes; gray and dark-field are judged on the whole image, as without resampling."""
    from napari_medseg.inference.segmenter import GRAY_NOTE
    from napari_medseg.inference.source import DARK_NOTE

    tissue = read_image(monuseg / "images" / "TCGA-21-5784-01Z-00-DX1.png")[:200, :300, :3]
    image = np.full((200, 1400, 3), 255, np.uint8)  # blocks of 1024 image px at 0.5 µm/px: the 2nd is glass
    image[:, :300] = tissue
    settings = TileSettings(128, 32)
    at_40x.segment(image, settings, pixel_size_um=0.5)
    notes = at_40x.last_report.notes
    assert any("resampled x2" in n for n in notes) and GRAY_NOTE not in notes and DARK_NOTE not in notes, notes
    gray = np.repeat(image.mean(-1, keepdims=True).astype(np.uint8), 3, -1)  # still said of a gray image
    at_40x.segment(gray, settings, pixel_size_um=0.5)
    assert at_40x.last_report.notes.count(GRAY_NOTE) == 1


@pytest.mark.parametrize("command", ["tune-threshold", "tune-nuclei", "tune-classes"])
def test_groups_and_all_images_are_one_or_the_other(command, tmp_path, consep):
    """README: [--groups g1,g2 | --all-images]; given both, --all-images had won and --groups been
    ignored silently (a tuning on 432 images instead of the 16 asked for)."""
    out = tmp_path / "t.safetensors"
    proc = medseg(command, "default", consep, "--out", out, "--groups", "train_10", "--all-images")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr, proc.stderr
    assert not out.exists()


def test_the_demo_refuses_a_missing_model_or_screenshot_folder_before_napari(tmp_path, monkeypatch):
    """``medseg demo --model missing.safetensors`` had shown an error notification and exited 0;
    a screenshot into a missing folder failed after the whole demo ran. Both: exit 2, and napari
    is never started."""
    import napari_medseg._napari.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo started"))
    assert_refused(medseg("demo", "--no-show", "--model", tmp_path / "missing.safetensors"), "does not exist")
    proc = medseg("demo", "--no-show", "--screenshot", tmp_path / "no" / "shot.png")
    assert proc.returncode == 2
    assert_refused(proc, f"{tmp_path / 'no'} does not exist")


def test_the_demo_without_a_display_says_how_to_run_it(monkeypatch):
    """Without a display Qt had aborted the process (exit 134, no message), even with --no-show."""
    import sys

    import napari_medseg._napari.demo as demo

    if not sys.platform.startswith("linux"):
        pytest.skip("displays are a Linux (X11 / Wayland) matter")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo started"))
    assert_refused(medseg("demo", "--no-show"), "needs a display", "xvfb-run -a medseg demo")


def test_an_output_folder_under_a_file_is_called_so(tmp_path, tiny_checkpoint, consep):
    """--out FILE/sub: the file in the way is named (the writability check had said 'Permission denied')."""
    from conftest import DATA

    blocker = tmp_path / "afile"
    blocker.write_text("")
    for inputs in ([consep / "images" / "train_2_006.png"],
                   [DATA / "slides" / "CMU-1-Small-Region.svs", "--region", "600,500,64,64"]):
        proc = medseg("predict", *inputs, "--model", tiny_checkpoint, "--out", blocker / "sub", "--device", "cpu")
        assert proc.returncode == 2
        assert_refused(proc, f"{blocker} is a file, not a folder")
        assert "Permission denied" not in proc.stderr
