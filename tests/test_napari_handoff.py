"""A run's result layers reach the viewer one per event-loop turn, so the window repaints and
answers between them (napari sets each layer up on the GUI thread)."""

import numpy as np
from napari.layers import Labels

from napari_medseg._napari.common import add_layers_in_turns


def _layers():
    return [Labels(np.zeros((64, 64), np.uint8), name="classes"), None,
            Labels(np.zeros((64, 64), np.int32), name="nuclei")]


def test_layers_go_in_one_per_turn_then_the_callback(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(len(viewer.layers)))
    assert [layer.name for layer in viewer.layers] == ["classes"] and done == []  # the rest waits a turn
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert [layer.name for layer in viewer.layers] == ["classes", "nuclei"] and done == [2]


def test_all_at_once_where_the_caller_reads_the_result_at_once(make_napari_viewer):
    viewer = make_napari_viewer()
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(len(viewer.layers)), in_turns=False)
    assert [layer.name for layer in viewer.layers] == ["classes", "nuclei"] and done == [2]
