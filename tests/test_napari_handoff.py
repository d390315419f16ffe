"""A run's result layers reach the viewer a step per event-loop turn (each added hidden, without
outlines or drawing overlays, the user's selection kept; then each overlay put back, shown, outlined),
so the window repaints and answers between them (napari sets each layer up, slices and outlines
it on the GUI thread)."""

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


def test_drawing_overlays_come_back_and_the_selection_stays(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((64, 64), np.uint8), name="image")
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(True))
    classes = viewer.layers["classes"]
    assert "polygon" not in classes._overlays  # napari makes its visual a turn later
    assert viewer.layers.selection.active is image  # the new layers' controls are not shown
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    canvas = viewer.window._qt_viewer.canvas
    for layer in (classes, viewer.layers["nuclei"]):
        assert {"polygon", "brush_stroke"} <= set(layer._overlays)
        assert {layer._overlays["polygon"], layer._overlays["brush_stroke"]} <= set(canvas._layer_overlay_to_visual[layer])
    assert viewer.layers.selection.active is image  # still the user's (a drawn region stays active)
    nuclei = viewer.layers["nuclei"]
    for mode in ("polygon", "paint", "pan_zoom"):  # the drawing tools work on the result
        nuclei.mode = mode
    assert nuclei._overlays["polygon"].enabled is False and nuclei.mode == "pan_zoom"


def test_a_layer_deleted_during_the_hand_off_is_left_out(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append([layer.name for layer in viewer.layers]))
    viewer.layers.remove("classes")  # the user deletes it before its turns are over
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert done == [["nuclei"]] and viewer.layers["nuclei"].visible


def test_through_the_viewer_proxy_plugins_get(make_napari_viewer, qtbot, recwarn):
    """A widget holds napari's public-only proxy of the viewer: the hand-off keeps the selection
    there too, without napari's private-access warnings in the user's terminal."""
    from napari.utils._proxies import PublicOnlyProxy

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((64, 64), np.uint8), name="image")
    done = []
    add_layers_in_turns(PublicOnlyProxy(viewer), _layers(), lambda: done.append(True))
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert [layer.name for layer in viewer.layers] == ["image", "classes", "nuclei"]
    assert viewer.layers.selection.active is image
    assert not [w for w in recwarn if "Private attribute access" in str(w.message)]


def test_the_turns_stop_when_their_widget_goes(make_napari_viewer, qtbot):
    """The viewer closed halfway (its dock widgets deleted): no more steps, no callback into the
    deleted widget (its status line would raise "wrapped C/C++ object ... has been deleted")."""
    from qtpy.QtWidgets import QWidget

    viewer = make_napari_viewer()
    owner, done = QWidget(), []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(True), owner=owner)
    assert [layer.name for layer in viewer.layers] == ["classes"]
    owner.deleteLater()
    qtbot.wait(300)
    assert done == [] and [layer.name for layer in viewer.layers] == ["classes"]
    assert not viewer.layers["classes"].visible


def test_an_owner_that_stays_sees_the_end(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QWidget

    viewer = make_napari_viewer()
    owner, done = QWidget(), []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(True), owner=owner)
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert [layer.name for layer in viewer.layers] == ["classes", "nuclei"]
    owner.deleteLater()


def test_a_failing_step_is_shown_and_the_rest_still_runs(make_napari_viewer, qtbot, monkeypatch):
    """The Run button comes back (``then``) even when napari fails on one layer's step."""
    from napari.utils.notifications import notification_manager

    import napari_medseg._napari.common as common

    shown = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *args: shown.append(args[1]))
    steps_to_add = common._steps_to_add

    def failing_first(viewer, layer):
        steps = steps_to_add(viewer, layer)
        if layer.name == "classes":
            steps[1] = lambda: 1 / 0
        return steps

    monkeypatch.setattr(common, "_steps_to_add", failing_first)
    viewer = make_napari_viewer()
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(True))
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    assert [type(e) for e in shown] == [ZeroDivisionError]
    assert [layer.name for layer in viewer.layers] == ["classes", "nuclei"] and viewer.layers["nuclei"].visible


def test_the_canvas_repaint_waits_a_turn_and_comes_back(make_napari_viewer, qtbot):
    """The turn that adds a (hidden) layer does not repaint the canvas: its repaint comes a turn
    later, on a timer of its own, so every step ends with the canvas painting again."""
    from napari.utils._proxies import PublicOnlyProxy

    viewer = make_napari_viewer()
    canvas = viewer.window._qt_viewer.canvas.native
    done = []
    add_layers_in_turns(PublicOnlyProxy(viewer), _layers(), lambda: done.append(True))
    assert [layer.name for layer in viewer.layers] == ["classes"] and not canvas.updatesEnabled()
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    qtbot.waitUntil(canvas.updatesEnabled, timeout=1_000)


def test_the_canvas_repaints_again_when_adding_fails(make_napari_viewer, qtbot, monkeypatch):
    from napari.utils.notifications import notification_manager

    import napari_medseg._napari.common as common

    shown = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *args: shown.append(args[1]))
    monkeypatch.setattr(common, "_add_unselected", lambda viewer, layer: 1 / 0)
    viewer = make_napari_viewer()
    canvas = viewer.window._qt_viewer.canvas.native
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(True))
    qtbot.waitUntil(lambda: done != [], timeout=5_000)
    qtbot.waitUntil(canvas.updatesEnabled, timeout=1_000)
    assert ZeroDivisionError in [type(e) for e in shown]


def test_a_hand_off_of_another_widget_keeps_its_hold(make_napari_viewer, qtbot):
    """Two hand-offs at once (Segment's and Train's): the second does not repaint early for the
    first, nor leave the canvas held."""
    viewer = make_napari_viewer()
    canvas = viewer.window._qt_viewer.canvas.native
    done = []
    add_layers_in_turns(viewer, _layers(), lambda: done.append(1))
    add_layers_in_turns(viewer, [Labels(np.zeros((8, 8), np.uint8), name="other")], lambda: done.append(2))
    assert not canvas.updatesEnabled()
    qtbot.waitUntil(lambda: sorted(done) == [1, 2], timeout=5_000)
    qtbot.waitUntil(canvas.updatesEnabled, timeout=1_000)
