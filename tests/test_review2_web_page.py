"""The browser front's page, without a browser: what a pathologist reads after Segment and Compare
(real CoNSeP / MoNuSeg files through the shipped model, as `medseg web` runs it)."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio", reason="the web extra (gradio) is part of the test install")

from napari_medseg.web import app as web_app  # noqa: E402
from napari_medseg.web.session import DEFAULT_MODEL, ModelStore, compare_upload, segment_upload  # noqa: E402

STEM = "train_19_005"


@pytest.fixture(scope="module")
def store():
    return ModelStore(backend="auto")  # as `medseg web` starts it (--backend auto)


def test_a_result_lists_what_concerns_its_image_not_how_the_runtime_was_chosen(store, consep, tmp_path):
    """Each image had carried the runtime's notes ('openvino bf16 kept float32: argmax agreement
    99.64% < 99.9%' under every result); the image's own notes (gray here) stay."""
    from PIL import Image

    with store.lock:
        segmenter = store.get(DEFAULT_MODEL)
        if not segmenter.backend.notes:
            pytest.skip("this machine's runtime was chosen without a note")
        gray = tmp_path / "gray.png"
        Image.open(consep / "images" / f"{STEM}.png").convert("L").save(gray)
        result = segment_upload(gray, segmenter)
    assert not set(result.notes) & set(segmenter.backend.notes), result.notes
    assert any("gray" in note for note in result.notes)


def test_merged_classes_show_no_wrong_class_swatch(store, consep):
    """A ground truth without classes merges the prediction's: no pixel can be of the wrong class,
    and the legend no longer offers the colour (it did, beside a note saying the classes were merged)."""
    with store.lock:
        result = segment_upload(consep / "images" / f"{STEM}.png", store.get(DEFAULT_MODEL))
    compare_upload(result, consep / "instances" / f"{STEM}.tif")
    *_, note, errors = web_app._comparison_view({result.name: result}, result.name)
    assert "merged" in note and "wrong class" not in note and "false negative" in note
    assert not (errors == 0).all()
    compare_upload(result, consep / "labels" / f"{STEM}.tif")  # classes compared: the swatch is back
    assert "wrong class" in web_app._comparison_view({result.name: result}, result.name)[1]


def test_segment_shows_one_progress_bar(store):
    """Segment's progress was drawn over each of its ten outputs (image list, overlay, legend, counts,
    metrics, ...): a page of overlapping bars, the status text unreadable under one."""
    page = web_app.build_app(store)
    config = page.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    segment = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "segment")
    run = next(d for d in config["dependencies"] if any(t[0] == segment for t in d["targets"]))
    assert [ids[i] for i in run["show_progress_on"]] == ["status"]
