"""A run's result layers reach the viewer a step per event-loop turn (each added hidden and
without outlines, then shown, then outlined), so the window repaints and answers between
them (napari sets each layer up, slices and outlines it on the GUI thread)."""

import numpy as np
from napari.layers import Labels

from napari_medseg._napari.common import add_layers_in_turns


def _layers():
    nuclei = Labels(np.zeros((64, 64), np.int32), name="nuclei")
    nuclei.contour = 2
    return [Labels(np.zeros((64, 64), np.uint8), name="classes"), None, nuclei]


def test_layers_go_in_one_per_turn_then_the_callback(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(len(viewer.layers)))
    assert [layer.name for layer in viewer.layers] == ["classes"] and done == []  # the rest waits a turn
    assert not viewer.layers["classes"].visible  # shown a turn later
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert [layer.name for layer in viewer.layers] == ["classes", "nuclei"] and done == [2]
    assert all(layer.visible for layer in viewer.layers) and viewer.layers["nuclei"].contour == 2


def test_a_layer_meant_hidden_stays_hidden(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    hidden = Labels(np.zeros((64, 64), np.uint8), name="hidden", visible=False)
    done = []
    add_layers_in_turns(viewer, [hidden], lambda: done.append(True))
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert not viewer.layers["hidden"].visible


def test_all_at_once_where_the_caller_reads_the_result_at_once(make_napari_viewer):
    viewer = make_napari_viewer()
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(len(viewer.layers)), in_turns=False)
    assert [layer.name for layer in viewer.layers] == ["classes", "nuclei"] and done == [2]
    assert all(layer.visible for layer in viewer.layers) and viewer.layers["nuclei"].contour == 2
