"""``medseg predict SLIDE`` as a user meets it: refusals before the model loads, what a run says
of the tissue it looked for, a damaged slide named as such."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile import assert_refused, medseg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def test_pixel_size_none_for_a_slide_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """It had been refused only once the model had loaded (10+ s with the default)."""
    from napari_medseg.inference import Segmenter

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a run that is refused")

    monkeypatch.setattr(Segmenter, "load", no_load)
    out = tmp_path / "out"
    proc = medseg("predict", SLIDE, "--region", "0,0,256,256", "--pixel-size", "none", "--out", out)
    assert_refused(proc, "--pixel-size none: slides are segmented at the pixel size they record")
    assert "AssertionError" not in proc.stderr and not out.exists()


def test_a_run_without_the_tissue_finder_does_not_claim_all_tissue(tmp_path, tiny_checkpoint):
    """--no-skip-background: the glass corner of CMU-1 had been reported as '100% tissue'."""
    out = tmp_path / "out"
    proc = medseg("predict", SLIDE, "--region", "0,0,256,256", "--no-skip-background", "--model", tiny_checkpoint,
                  "--out", out, "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert proc.returncode == 0, proc.stderr
    assert "tissue not looked for (--no-skip-background" in proc.stdout and "% tissue" not in proc.stdout
    with_finder = medseg("predict", SLIDE, "--region", "0,0,256,256", "--model", tiny_checkpoint,
                         "--out", tmp_path / "out2", "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert with_finder.returncode == 0 and "% tissue" in with_finder.stdout


def test_a_truncated_slide_is_called_truncated(tmp_path, tiny_checkpoint):
    """A copy of the Aperio slide cut at 30 % (its image directories lost): 'looks truncated', with
    where (it had been OpenSlide's 'Unsupported or missing image file'). Cut at 70 % (its image
    whole, the label and macro images' directories lost): segmented, with a note saying so, and
    no tifffile log lines on the terminal."""
    data = SLIDE.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[:int(0.3 * len(data))])
    err = assert_refused(medseg("predict", cut, "--region", "0,0,256,256", "--model", tiny_checkpoint,
                                "--out", tmp_path / "out", "--device", "cpu"),
                         "'cut.svs': the file looks truncated (its header places the first image directory at byte",
                         f"the file ends at byte {int(0.3 * len(data)):,}")
    assert "Unsupported" not in err
    tail = tmp_path / "tail.svs"
    tail.write_bytes(data[:int(0.7 * len(data))])
    proc = medseg("predict", tail, "--region", "800,800,128,128", "--model", tiny_checkpoint, "--out",
                  tmp_path / "out", "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert proc.returncode == 0, proc.stderr
    assert "tail.svs: the file looks truncated (image directory 2 lies at byte" in proc.stderr
    assert "invalid page offset" not in proc.stderr
    # a whole slide says nothing of the kind
    whole = medseg("predict", SLIDE, "--region", "800,800,128,128", "--model", tiny_checkpoint, "--out",
                   tmp_path / "out2", "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert whole.returncode == 0 and "truncated" not in whole.stderr


def test_a_slide_that_cannot_run_is_said_before_the_model_loads(tmp_path, monkeypatch):
    """A region off the slide and a cut-off slide: skipped, said, exit 1, without loading the model
    (each had waited for it: 10+ s with the default on a first run)."""
    from napari_medseg.inference import Segmenter

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a run that has nothing to segment")

    monkeypatch.setattr(Segmenter, "load", no_load)
    cut = tmp_path / "cut.svs"
    cut.write_bytes(SLIDE.read_bytes()[:500_000])
    proc = medseg("predict", SLIDE, "--region", "3000,0,10,10", "--out", tmp_path / "out")
    assert proc.returncode == 1 and "Region x=3000, y=0, 10x10 is not on the slide (2220x2967 px)" in proc.stderr
    proc = medseg("predict", cut, "--region", "0,0,10,10", "--out", tmp_path / "out")
    assert proc.returncode == 1 and "looks truncated" in proc.stderr and "AssertionError" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_region_past_the_slides_edge_is_said_to_be_clipped(tmp_path, tiny_checkpoint):
    """A region reaching past the slide ran on what is on it without a word (a typo'd 50000 had run
    on the whole slide); now the clipping is said, with the region that ran."""
    proc = medseg("predict", SLIDE, "--region", "2100,2900,5000,5000", "--model", tiny_checkpoint, "--out",
                  tmp_path / "out", "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert proc.returncode == 0, proc.stderr
    assert "region 2100,2900,120,67" in proc.stdout
    assert ("--region 2100,2900,5000,5000 reaches past the slide (2220x2967 px): clipped to 2100,2900,120,67"
            in proc.stderr)
    inside = medseg("predict", SLIDE, "--region", "2000,2800,100,60", "--model", tiny_checkpoint, "--out",
                    tmp_path / "out2", "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert inside.returncode == 0 and "clipped" not in inside.stderr
