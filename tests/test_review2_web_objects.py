"""The Objects widget as a pathologist uses it after Segment: it measures Segment's result (not the
ground truth opened before it), its table sorts by a column's numbers, and a row chosen in the table
brings that nucleus into view."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._napari.sample_data import consep_sample

PLUGIN = "napari-medseg"


@pytest.fixture
def measured(make_napari_viewer):
    """The CoNSeP sample (its H&E at 0.25 µm/px, ground truth and nucleus ids) measured in Objects."""
    viewer = make_napari_viewer()
    image, instances, truth = [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in consep_sample()]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    widget.class_layer.value, widget.instance_layer.value = truth, instances
    assert widget.measure() is not None, widget.summary.value
    return viewer, widget, instances


def test_objects_opened_after_segment_measures_segments_result(make_napari_viewer):
    """The sample opened, segmented, Objects opened: its class map was the ground truth (the first
    Labels layer) and Measure counted the truth's nuclei, another number than Segment's."""
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    seg.run(threaded=False)
    _, obj = viewer.window.add_plugin_dock_widget(PLUGIN, "Objects")
    nuclei = viewer.layers["CoNSeP H&E nuclei"]
    assert obj.class_layer.value is viewer.layers["CoNSeP H&E segmentation"]
    assert obj.instance_layer.value is nuclei
    obj.measure()
    count = len(np.unique(nuclei.data)) - 1
    assert seg.status.value.startswith(f"Done: {count} nuclei") and obj.summary.value.startswith(f"{count} nuclei")


def test_a_header_click_sorts_the_nuclei_by_number(measured):
    """Clicking 'area' did nothing; now the rows go smallest first (9 before 10, not as text), each
    keeping its nucleus id, then largest first; the export keeps the measured order."""
    viewer, widget, instances = measured
    q = widget.table.native

    def shown():
        value = widget.table.value
        column = list(value["columns"]).index("area")
        return [int(i) for i in value["index"]], [row[column] for row in value["data"]]

    ids, areas = shown()
    assert areas != sorted(areas)  # the measured order is the ids', not the areas'
    area_column = list(widget.table.value["columns"]).index("area")
    q.horizontalHeader().sectionClicked.emit(area_column)
    ids, areas = shown()
    assert areas == sorted(areas) and len(areas) == len(widget.objects["label"])
    assert all(area == int((instances.data == i).sum()) for i, area in zip(ids, areas))
    assert len({len(str(a)) for a in areas}) > 1  # numbers of several digits: a text sort would differ
    q.horizontalHeader().sectionClicked.emit(area_column)
    assert shown()[1] == sorted(areas, reverse=True)
    assert list(widget.objects["label"]) == sorted(widget.objects["label"])


def test_choosing_a_row_brings_its_nucleus_into_view(measured):
    """A row chosen: the view centres on that nucleus (in the layer's µm) and the nuclei layer's
    selected label is its id; before, nothing in the viewer answered the table."""
    viewer, widget, instances = measured
    q = widget.table.native
    q.horizontalHeader().sectionClicked.emit(0)
    q.horizontalHeader().sectionClicked.emit(0)  # the largest nucleus first
    nucleus = int(q.verticalHeaderItem(0).text())
    viewer.camera.center = (0, 0)
    q.selectRow(0)
    ys, xs = np.nonzero(instances.data == nucleus)
    expected = instances.data_to_world([ys.mean(), xs.mean()])
    np.testing.assert_allclose(viewer.camera.center[-2:], expected, atol=1e-3)
    assert instances.selected_label == nucleus
