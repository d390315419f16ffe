"""``medseg`` as a newcomer met it: a failed train left an empty run folder, a slide named twice
was refused only after the first was segmented, ``medseg web`` on a bad host or a taken port
ended in Gradio's words, and ``--region -10,...`` was read as an option."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hostile import assert_refused, medseg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _refuse_model_loads(monkeypatch) -> None:
    """A run refused up front must not load a model (a whole slide's work would follow it)."""
    from napari_medseg.inference import Segmenter

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a run that is refused")

    monkeypatch.setattr(Segmenter, "load", no_load)


def test_a_train_refused_for_its_data_leaves_no_folder_and_names_the_path_it_looked_at(tmp_path, monkeypatch):
    """Before: 'Dataset 'nothere' does not exist.', and an empty runs/x/ left behind (the folder was
    made before the data was read). Now no folder, and the absolute path, from the current folder."""
    monkeypatch.chdir(tmp_path)
    proc = medseg("train", REPO / "configs" / "smoke.yaml", "--set", "data.dataset=nothere", "--set",
                  "out_dir=runs/x")
    assert_refused(proc, f"Dataset 'nothere' (data.dataset) does not exist: no folder {tmp_path / 'nothere'} "
                         f"(relative paths are read from the current folder {tmp_path}).")
    assert not (tmp_path / "runs").exists()
    # an absolute path is said as it is; a folder that was there before the run is kept
    (tmp_path / "kept").mkdir()
    proc = medseg("train", REPO / "configs" / "smoke.yaml", "--set", f"data.dataset={tmp_path / 'gone'}",
                  "--set", f"out_dir={tmp_path / 'kept' / 'run'}")
    assert_refused(proc, f"does not exist: no folder {tmp_path / 'gone'}.")
    assert "relative paths" not in proc.stderr
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "run").exists()


def test_a_folder_the_failed_run_wrote_into_is_kept(tmp_path):
    """Only empty folders this run made go: one holding a file stays."""
    from napari_medseg.training.checkpoints import removed_if_failed_empty

    out = tmp_path / "runs" / "x"
    with pytest.raises(RuntimeError), removed_if_failed_empty(out):
        out.mkdir(parents=True)
        (out / "log.txt").write_text("written")
        raise RuntimeError("failed after writing")
    assert (out / "log.txt").is_file()
    with pytest.raises(RuntimeError), removed_if_failed_empty(tmp_path / "a" / "b"):
        (tmp_path / "a" / "b").mkdir(parents=True)
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "a").exists()


def test_a_slide_named_twice_is_refused_before_any_work(tmp_path, monkeypatch):
    """Before: the first was segmented, then the second refused ('already holds results')."""
    _refuse_model_loads(monkeypatch)
    out = tmp_path / "out"
    proc = medseg("predict", SLIDE, SLIDE, "--region", "0,0,300,300", "--out", out)
    assert_refused(proc, f"{SLIDE} is given twice: both would write {out / 'CMU-1-Small-Region'}*. "
                         "Give each slide once.")
    link = tmp_path / "other-name.svs"
    link.symlink_to(SLIDE)
    proc = medseg("predict", SLIDE, link, "--whole-slide", "--out", out)
    assert_refused(proc, f"{SLIDE} and {link} are the same file ({SLIDE}): it would be segmented twice.")
    assert "AssertionError" not in proc.stderr and not out.exists()


@pytest.fixture
def taken_port():
    """A port something already listens on (127.0.0.1)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_web_on_a_taken_port_or_an_impossible_host_is_said_plainly(taken_port, monkeypatch):
    """Before: Gradio's 'Cannot find empty port in range: 7860-7860 ... launch()' for both."""
    pytest.importorskip("gradio", reason="the web extra (gradio) is part of the test install")
    import napari_medseg.web.app as app

    def no_serve(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(app, "serve", no_serve)
    proc = medseg("web", "--port", taken_port)
    assert_refused(proc, f"port {taken_port} on 127.0.0.1 is in use", "choose another with --port")
    proc = medseg("web", "--host", "0.0.0.0", "--port", taken_port)
    assert_refused(proc, f"port {taken_port} on 0.0.0.0 is in use")
    proc = medseg("web", "--host", "256.1.1.1")
    assert_refused(proc, "--host 256.1.1.1: not an address or name this machine can resolve", "use 127.0.0.1")
    proc = medseg("web", "--host", "192.0.2.1")  # TEST-NET-1: never this machine's
    assert_refused(proc, "--host 192.0.2.1 is not an address of this machine")
    assert "AssertionError" not in proc.stderr and "Cannot find empty port" not in proc.stderr


def test_a_region_starting_with_a_minus_is_a_region(tmp_path, monkeypatch):
    """Before: 'argument --region: expected one argument' (only --region=-10,... worked). Now the
    value is read, and a region off the slide gets its own message, before the model loads."""
    from napari_medseg.cli import build_parser
    from napari_medseg.cli.entry import _negative_values_joined

    argv = ["predict", "s.svs", "--region", "-10,0,100,100", "--out", "o"]
    assert build_parser().parse_args(_negative_values_joined(argv)).region == "-10,0,100,100"
    assert _negative_values_joined(["predict", "--", "--region", "-1,0,1,1"])[2:] == ["--region", "-1,0,1,1"]
    _refuse_model_loads(monkeypatch)
    out = tmp_path / "out"
    proc = medseg("predict", SLIDE, "--region", "-200,-5,100,100", "--out", out)
    assert proc.returncode == 1 and "expected one argument" not in proc.stderr
    assert "Region x=-200, y=-5, 100x100 is not on the slide (2220x2967 px)" in proc.stderr
    proc = medseg("predict", SLIDE, "--region", "-200", "--out", out)
    assert_refused(proc, "Region '-200': expected four integers x,y,width,height")
    proc = medseg("predict", SLIDE, "--region", "0,0,9,9", "--class-weights", "-1,2", "--out", out)
    assert_refused(proc, "--class-weights: expected numbers above 0")
    assert not out.exists()


def test_a_region_reaching_past_the_edge_from_a_minus_runs_clipped(tmp_path, tiny_checkpoint):
    """``--region -10,0,100,100`` as a user types it runs on the part on the slide, said as clipped."""
    proc = medseg("predict", SLIDE, "--region", "-10,0,100,100", "--model", tiny_checkpoint, "--out",
                  tmp_path / "out", "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert proc.returncode == 0, proc.stderr
    assert "--region -10,0,100,100 reaches past the slide (2220x2967 px): clipped to 0,0,90,100" in proc.stderr


def test_version_names_the_release():
    """A bug report or a methods section needs the release a result came from."""
    from napari_medseg import __version__

    proc = medseg("--version", process=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"medseg (napari-medseg) {__version__}"


def test_predict_says_how_many_nuclei_each_image_holds(tmp_path, consep):
    """The web page said '397 nuclei' of an image; medseg predict said only where it wrote the
    files. Each image's count now comes with its classes, the same as its CSV table's rows."""
    import csv

    images = [consep / "images" / "train_12_005.png", consep / "images" / "train_19_005.png"]
    proc = medseg("predict", *images, "--out", tmp_path / "out", "--pixel-size", "0.25")
    assert proc.returncode == 0, proc.stderr
    for image in images:
        with open(tmp_path / "out" / "nuclei" / f"{image.stem}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        by_class: dict[str, int] = {}
        for row in rows:
            by_class[row["class"]] = by_class.get(row["class"], 0) + 1
        order = ["other", "inflammatory", "epithelial", "spindle"]
        said = ", ".join(f"{c} {by_class[c]}" for c in order if c in by_class)
        assert len(rows) > 5 and f"{image.name}: {len(rows)} nuclei ({said})" in proc.stdout.splitlines()
