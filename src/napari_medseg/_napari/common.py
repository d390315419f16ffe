"""What every widget shares: how a failure reaches the user, how work leaves the GUI thread, and
which Labels layers can be class maps.

Every widget takes the viewer as ``napari_viewer``: napari passes its viewer (behind a proxy
that hides private attributes) to a parameter of that name, or to one annotated
``napari.viewer.Viewer``. It compares annotations as text, so under ``from __future__ import
annotations`` a quoted one reads "'napari.viewer.Viewer'", is missed, and the Plugins menu
entry fails with "missing 1 required positional argument: 'viewer'".
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Callable

import numpy as np

from ..devices import ALWAYS_THERE, probe_devices
from ..errors import MedsegError


class WidgetInputError(MedsegError, ValueError):
    """A widget's inputs cannot work (nothing chosen, a missing file); the message says what to do."""


def report_error(status, error: BaseException | str, prefix: str = "") -> str:
    """Tell the user why an action failed; returns what follows ``'Error: '`` on ``status``.

    A ``MedsegError`` (or a plain message) is the user's to fix: its message goes on the status
    line and into a notification, as it is. Anything else is a bug: napari's notification
    carries its traceback, and the status line names it.
    """
    from napari.utils.notifications import notification_manager, show_error

    if isinstance(error, (str, MedsegError)):
        message = f"{prefix}{error}"
        status.value = f"Error: {message}"
        show_error(message)
        return message
    message = f"{prefix}{type(error).__name__}: {error}"
    status.value = f"Error: {message} (unexpected: the traceback is in napari's notifications)"
    notification_manager.receive_error(type(error), error, error.__traceback__)
    return message


_warming = None


def warm_label_visuals() -> None:
    """Make vispy's line dash patterns and import what napari's first result layer imports, on a
    background thread, once per process.

    Every napari Labels layer carries a polygon-drawing overlay whose line visuals build vispy's
    dash atlas; its 13 patterns are made in pure Python (0.2-0.4 s here) and cached, so the first
    result layer of a session paid for them on the GUI thread. And a result layer's first
    construction imports pandas (its features table), scikit-image's colour module and
    scipy.linalg (~380 modules; importing ``skimage.color`` alone loads none of it, as it is
    lazy): in the worker that builds the result layers at a run's end, their extension modules'
    set-up held the interpreter lock for up to 0.1 s at a time while the GUI thread took the
    results in. A tiny class map and nucleus layer, made here as a result's are, does it all while
    the user works.
    """
    global _warming
    if _warming is not None:
        return

    def make_patterns():
        with contextlib.suppress(Exception):  # a vispy without it: the first layer pays, as before
            from vispy.visuals.line.dash_atlas import DashAtlas

            DashAtlas()
        with contextlib.suppress(Exception):  # a napari that differs: the first result pays, as before
            from napari.layers import Labels

            from .layers import class_labels_kwargs, instance_labels_kwargs

            classes, tiny = ["background", "nucleus"], np.zeros((2, 2), np.int32)
            Labels(tiny, **class_labels_kwargs("warm-up", classes))
            Labels(tiny, **instance_labels_kwargs("warm-up", classes, None, np.array([0, 1])))

    _warming = threading.Thread(target=make_patterns, name="medseg-warm-visuals", daemon=True)
    _warming.start()


def device_choices(_widget=None) -> list[str]:
    """A device ComboBox's choices: torch's devices once ``follow_devices`` has them, else those
    every machine has (``auto`` still finds a GPU when the run starts)."""
    return list(_devices or ALWAYS_THERE)


def follow_devices(combo, owner) -> None:
    """Fill ``combo`` (its choices ``device_choices``) with torch's devices once known. They are
    asked of a child python (``probe_devices``) from a plain thread, once per session: torch
    loaded into the viewer froze it for seconds as a widget opened and, for slides (run in a child
    process of their own), for nothing; every later garbage collection in the viewer took twice as
    long. A timer owned by ``owner`` (the widget's Qt widget, so it goes with it) shows the answer:
    a Qt worker's signals outliving the viewer had aborted the process at exit."""
    global _device_probe
    if _devices is None and _device_probe is None:
        def probe() -> None:
            global _devices
            _devices = probe_devices()

        _device_probe = threading.Thread(target=probe, name="medseg-device-probe", daemon=True)
        _device_probe.start()
    from qtpy.QtCore import QTimer

    poll = QTimer(owner)
    poll.setInterval(DEVICE_POLL_MS)

    def show() -> None:
        if _devices is not None:
            poll.stop()
            combo.reset_choices()

    poll.timeout.connect(_guarded(show))
    poll.start()


_devices: list[str] | None = None  # the compute devices, once probed (the same all session)
_device_probe = None  # the thread that asks
DEVICE_POLL_MS = 250


def add_layers_in_turns(viewer, layers: list, then: Callable[[], None], in_turns: bool = True,
                        owner=None) -> None:
    """Add ``layers`` to ``viewer`` a step per turn of the Qt event loop, then call ``then()``.

    napari sets a layer up on the GUI thread (its vispy visual and overlays, its controls), then
    slices it, computes a Labels layer's outlines (``contour``) and paints: 0.2-0.3 s a layer
    here, all in one turn. So each layer goes in hidden, without outlines and drawing overlays and
    leaving the user's selection as it is; its overlays come back, it is shown and outlined in the
    turns after; between turns the window repaints and answers. ``in_turns=False`` adds them all
    now, as napari adds a layer (scripts and tests that read the result at once). ``owner``: the
    widget's Qt widget; the turns stop if it goes (the viewer closed halfway, ``then`` not called).
    """
    pending = [layer for layer in layers if layer is not None]
    if not in_turns or not pending:
        for layer in pending:
            viewer.add_layer(layer)
        then()
        return
    from qtpy.QtCore import QTimer

    steps = [step for layer in pending for step in _steps_to_add(viewer, layer)]
    timer = QTimer(owner)  # a child of the widget: deleted with it, it never fires again
    timer.setSingleShot(True)
    timer.setInterval(TURN_GAP_MS)
    if owner is None:
        _unowned_turns.add(timer)  # nothing else holds it

    def next_turn():
        _guarded(steps.pop(0))()  # a step that fails is shown; the others and ``then`` still run
        if steps:
            with contextlib.suppress(RuntimeError):  # its owner went during this step: stop here
                timer.start()
        else:
            _unowned_turns.discard(timer)
            then()

    timer.timeout.connect(_guarded(next_turn))
    _guarded(next_turn)()


_unowned_turns: set = set()  # the timers of hand-offs under way without an owner widget

# between two steps, the event loop answers input and repaints first: a zero delay let Qt run the
# next step before its timers and input (a 5 ms timer missed two steps in a row)
TURN_GAP_MS = 10
# a Labels layer's drawing overlays (polygon, brush): napari makes a vispy visual for each as the
# layer is added (~15-20 ms each here), though they show only while the user draws
DEFERRED_OVERLAYS = ("polygon", "brush_stroke")


def _steps_to_add(viewer, layer) -> list[Callable[[], None]]:
    """``layer`` added hidden, without outlines and drawing overlays; then each overlay put back,
    shown, outlined: one step each."""
    visible, contour = layer.visible, getattr(layer, "contour", 0)
    layer.visible = False
    if contour:
        layer.contour = 0
    overlays = _take_overlays(layer)
    steps = [lambda: _add_before_repainting(viewer, layer)]
    steps += [functools.partial(layer._overlays.__setitem__, key, overlay) for key, overlay in overlays.items()]
    if visible:
        steps.append(lambda: setattr(layer, "visible", True))
    if contour:
        steps.append(lambda: setattr(layer, "contour", contour))
    return steps


def _add_before_repainting(viewer, layer) -> None:
    """``layer`` added (``_add_unselected``) with the canvas's repaint held to the next turn: the
    layer goes in hidden, so the repaint napari asks for draws nothing new, and in the same turn
    as napari's set-up it cost this turn ~15 ms of software GL under Xvfb. The repaint comes back
    on a timer of its own, whatever becomes of the other turns."""
    canvas = _canvas_widget(viewer)
    if canvas is None or not canvas.updatesEnabled():  # napari differs, or another hand-off holds it
        return _add_unselected(viewer, layer)
    from qtpy.QtCore import QTimer

    def repaint_again() -> None:
        with contextlib.suppress(RuntimeError):  # the window closed in between
            canvas.setUpdatesEnabled(True)

    canvas.setUpdatesEnabled(False)
    try:
        _add_unselected(viewer, layer)
    finally:
        QTimer.singleShot(TURN_GAP_MS, repaint_again)


def _canvas_widget(viewer):
    """The Qt widget napari draws the layers in (napari's private path; ``None`` where it differs)."""
    with _private_access():
        window = getattr(viewer, "window", None)
        canvas = getattr(getattr(window, "_qt_viewer", None), "canvas", None)
        native = getattr(canvas, "native", None)
    native = getattr(native, "__wrapped__", native)  # the plugin's viewer proxy wraps what it returns
    return native if hasattr(native, "setUpdatesEnabled") else None


def _add_unselected(viewer, layer) -> None:
    """``layer`` added, the user's selection kept: selecting a new layer shows its controls, a
    layout and first paint of their own (the one turn above 100 ms here when the result layers
    were selected at the end), and the user's own layer (the rectangle just drawn) stays the one
    to draw the next region on. napari's private switch (selecting, then reselecting the user's
    layer, costs as much); where it is missing, napari selects."""
    layers = viewer.layers
    with _private_access():
        activate = getattr(layers, "_activate_on_insert", None)
    if activate is None:
        return viewer.add_layer(layer)
    with _private_access():
        layers._activate_on_insert = False
    try:
        viewer.add_layer(layer)
    finally:
        with _private_access():
            layers._activate_on_insert = activate


@contextlib.contextmanager
def _private_access():
    """napari's viewer proxy (what a plugin widget is given) warns on each private attribute, in
    the user's terminal; the one use above is known and falls back when it goes."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Private attribute access", category=FutureWarning)
        yield


def _take_overlays(layer) -> dict:
    """``DEFERRED_OVERLAYS`` taken out of ``layer`` (napari's private overlay dict; none where it differs)."""
    held = getattr(layer, "_overlays", None)
    if held is None or not hasattr(held, "pop"):
        return {}
    return {key: held.pop(key) for key in DEFERRED_OVERLAYS if key in held}


# class maps are 8-bit where they are trained and scored: class ids 0-255 (a few classes)
CLASS_ID_LIMIT = 256


def class_map_top(name: str, data: np.ndarray, classes: list[str] | None = None, instead: str = "") -> int:
    """The highest id of the layer ``name``'s ``data`` read as a class map (of ``classes`` where it
    has names; unnamed, any id below ``CLASS_ID_LIMIT``). Raises ``WidgetInputError`` naming the
    layer otherwise; ``instead`` says where an instance map goes, for one that looks like it."""
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == bool):
        raise WidgetInputError(f"'{name}' holds {data.dtype} values; a class map holds integer class ids.")
    if data.size == 0:
        raise WidgetInputError(f"'{name}' is empty (shape {data.shape}).")
    low, top = int(data.min()), int(data.max())
    if low < 0:
        raise WidgetInputError(f"'{name}' holds the negative id {low}; class ids are 0 (background) and up: "
                               "paint those pixels with a class (or 0).")
    if top >= CLASS_ID_LIMIT:
        raise WidgetInputError(f"'{name}' holds id {top}: it looks like an instance map (one id per nucleus), not a "
                               f"class map (a few class ids, below {CLASS_ID_LIMIT}). {instead}".rstrip())
    if classes is not None and top >= len(classes):
        ids = int(np.count_nonzero(np.bincount(data.ravel().astype(np.intp, copy=False))[1:]))
        if ids > len(classes):  # more ids than classes: one per nucleus, not a few painted wrong
            raise WidgetInputError(f"'{name}' holds {ids} ids up to {top}: it looks like an instance map (one id per "
                                   f"nucleus), not a class map of {classes}. {instead}".rstrip())
        raise WidgetInputError(f"'{name}' holds class id {top}, but the classes are {classes} "
                               f"(ids 0 to {len(classes) - 1}); paint those pixels with one of them.")
    return top


def class_names(layer) -> list[str] | None:
    """The class names recorded on ``layer`` (``layers.layer_classes``), but none for more than
    ``CLASS_ID_LIMIT`` of them: numbered names given to an instance map's every id, whose per-class
    tables and menus would hold thousands of rows."""
    from .layers import layer_classes  # napari's colormaps: imported by the widgets, not by train_form

    names = layer_classes(layer) if layer is not None else None
    return names if names and len(names) <= CLASS_ID_LIMIT else None


def numbered_classes(top: int) -> list[str]:
    """Names for an unnamed class map whose highest id is ``top``."""
    return ["background"] + [f"class {i}" for i in range(1, top + 1)]


def start_worker(work: Callable, on_error: Callable[[BaseException], None], **slots: Callable):
    """Run ``work`` (a function or a generator function) in a napari thread worker, started.

    Each failure of ``work`` reaches ``on_error`` once, and nothing else shows it (superqt would
    drop a generator's ``RuntimeError``, torch's usual error, as a warning and never finish).
    ``slots`` connect the worker's other signals by name (``yielded``, ``returned``, ``aborted``,
    ``finished``). A slot that raises, ``on_error`` included, shows its traceback as a napari
    notification: raised into Qt it would abort the process (exit 134) where napari's exception
    hook is not installed.
    """
    from napari.qt.threading import create_worker

    def report(error: BaseException) -> None:
        _guarded(on_error)(error.error if isinstance(error, _WorkFailed) else error)

    connections = {"errored": report, **{name: _guarded(slot) for name, slot in slots.items()}}
    worker = create_worker(_carrying_errors(work), _connect=connections)
    relay = getattr(worker, "_relay_error", None)  # napari's own notification of the same error
    if relay is not None:
        with contextlib.suppress(TypeError, RuntimeError):  # not connected (PyQt6 skips its mixin's __init__)
            worker.errored.disconnect(relay)
    return worker


class _WorkFailed(Exception):
    """Carries an exception out of a worker's job; never a ``RuntimeError``, which superqt swallows."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _carrying_errors(work: Callable) -> Callable:
    """``work`` with its exceptions wrapped in ``_WorkFailed`` (a generator stays a generator)."""
    if inspect.isgeneratorfunction(work):
        @functools.wraps(work)
        def steps(*args, **kwargs):
            try:
                return (yield from work(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - handed to on_error as it is
                raise _WorkFailed(exc) from exc
        return steps

    @functools.wraps(work)
    def call(*args, **kwargs):
        try:
            return work(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to on_error as it is
            raise _WorkFailed(exc) from exc
    return call


def _guarded(slot: Callable) -> Callable:
    """``slot``, its own exceptions shown as napari notifications instead of raised into Qt."""
    @functools.wraps(slot)
    def run(*args):
        try:
            return slot(*args)
        except Exception as exc:  # noqa: BLE001 - a bug in a slot: its traceback, and the viewer lives on
            from napari.utils.notifications import notification_manager

            notification_manager.receive_error(type(exc), exc, exc.__traceback__)
    return run


def export_target(path_widget, given=None, confirm: Callable[[str], bool] | None = None):
    """Where an export goes: ``given``, else the path in ``path_widget``, else one the user picks
    in a save dialog; ``None`` when they cancel, or decline to replace an existing file.

    A relative path is taken from the home folder, not from wherever napari was started.
    """
    from pathlib import Path

    text = str(given or path_widget.value or "").strip()
    folder = Path(text).expanduser() if text not in ("", ".") else Path.home()
    if text in ("", ".") or folder.is_dir():
        # no file named: a cleared box reads as the folder napari started in, which had been offered
        # for 'replacing' ('/home/me exists. Replace it?'); a folder typed is where the dialog opens
        from qtpy.QtWidgets import QFileDialog

        text, _ = QFileDialog.getSaveFileName(None, "Export to", str(folder), path_widget.filter or "")
        if not text:
            return None
        path_widget.value = text  # the dialog itself asked before replacing a file
        return Path(text)
    target = Path(text).expanduser()
    if not target.is_absolute():
        target = Path.home() / target
    if target.exists() and not (confirm or confirm_replace)(str(target)):
        return None
    return target


def write_failure(target, exc: OSError):
    """What a failed export says: the writer's own message where it gave one ('Cannot write X:
    ... Nothing was written there.'), else the system's reason (it had said 'Cannot write X' twice)."""
    return exc if isinstance(exc, MedsegError) else f"Cannot write {target}: {exc.strerror or exc}"


def confirm_replace(path: str) -> bool:
    """Ask before replacing a file (a modal question; tests replace this function)."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(None, "Replace file?", f"{path} exists. Replace it?")
    return answer == QMessageBox.StandardButton.Yes


def step_from_own_value(box, own: Callable[[], float | None]) -> None:
    """Let a spin box whose lowest value stands for "the model's own" (its special text) step
    from that value: an arrow or the wheel at "model's (0.40)" goes to 0.35 or 0.45, not to the
    box's minimum + one step. ``own()`` is the model's value, None while unknown (then the box
    steps as any other). ``box``: a magicgui spin box; done on its Qt widget's step methods, so
    before the box is laid out or shown: PyQt takes a method Qt has called once unreplaced as never
    replaced (the arrows then stopped at "model's")."""
    native = box.native
    step_by, step_enabled = native.stepBy, native.stepEnabled

    def at_own() -> float | None:
        value = own()
        return value if value is not None and native.value() == native.minimum() else None

    def stepped(steps: int) -> None:
        value = at_own()
        if value is not None:
            native.setValue(value)  # one change signal, then the step's: both re-threshold the same way
        step_by(steps)

    def enabled():
        if at_own() is not None:
            flags = getattr(type(native), "StepEnabledFlag", type(native))  # scoped (Qt6) or not (Qt5)
            return flags.StepUpEnabled | flags.StepDownEnabled
        return step_enabled()

    native.stepBy, native.stepEnabled = stepped, enabled

