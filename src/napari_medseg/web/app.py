"""``medseg web``: the browser front, a Gradio page over ``web.session`` (which calls the core).

The page keeps each visitor's results in its own session state; runs go through Gradio's
queue one at a time (the model is loaded once and shared), and every error the user can fix
comes back as a message in the page.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

# no usage reports or version checks leave the machine (hospitals are often offline; the page is
# meant to run on one): set before gradio is imported, which reads it then
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from ..errors import MedsegError
from ..inference.rethreshold import Thresholds
from ..io.images import IMAGE_SUFFIXES
from ..io.slides import SLIDE_SUFFIXES
from ..steps import Cancelled
from ..wording import counted
from . import render
from .session import (DEFAULT_MODEL, METRIC_HEADERS, ModelStore, compare_upload, metrics_rows, nucleus_summary,
                      remove_results, results_folder, segment_uploads)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
SAMPLE_FILES = {"CoNSeP H&E patch (40x)": "consep_train_19_005.png",
                "MoNuSeg H&E crop (40x)": "monuseg_TCGA-A7-A13E_crop.png"}
COUNT_HEADERS = ["class", "nuclei", "mean area", "total area"]
# the stain the shipped model is for, said up front: the page had offered fluorescence, which no
# shipped model reads (a dark-background image is only flagged: inference.source.DARK_NOTE)
SUBTITLE = ("## napari-medseg: nuclei in your images\nUpload brightfield H&E images, segment them, and check the "
            "result against your own annotation. The shipped default model is made for H&E at 40x (about "
            "0.25 µm/px), not for fluorescence: a dark-background image gets a warning, and its nuclei are missing "
            "or wrong. Models for other stains: `medseg web --models DIR`. Research use only.")
MAX_UPLOAD = "200mb"
GRADIO_CACHE_SECONDS = 3600  # uploads and served files older than this go, checked as often


def _user_errors(handler):
    """A ``MedsegError`` becomes a message in the page; anything else stays a (logged) bug."""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except MedsegError as exc:  # stays until closed; a user's mistake is no server traceback
            raise gr.Error(str(exc), duration=None, print_exception=False) from exc
    return wrapped


_cancel_events: dict[str, threading.Event] = {}  # per browser session: its run stops at the next step


def _cancel_event(request: gr.Request | None, fresh: bool = False) -> threading.Event:
    key = getattr(request, "session_hash", None) or ""
    if fresh or key not in _cancel_events:
        _cancel_events[key] = threading.Event()
    return _cancel_events[key]


def _cancel(request: gr.Request):
    _cancel_event(request).set()
    return "Cancelling..."


def _left(request: gr.Request):
    """The visitor closed or reloaded the page: their run stops (it held the queue for everyone)."""
    key = getattr(request, "session_hash", None) or ""
    event = _cancel_events.pop(key, None)
    if event is not None:
        event.set()


def _upload_paths(files) -> list[str]:
    files = files if isinstance(files, list) else ([files] if files else [])
    return [f if isinstance(f, str) else f.name for f in files]


def _view(results: dict, name: str | None, opacity: float):
    """Overlay, legend, counts and downloads of one result."""
    if not results or name not in results:
        return None, "", None, []
    r = results[name]
    unit = "µm²" if r.pixel_size_um else "px"
    counts = gr.Dataframe(value=nucleus_summary(r), headers=[*COUNT_HEADERS[:2], f"mean area ({unit})",
                                                               f"total area ({unit})"])
    overlay = render.enlarged(render.class_overlay(r.display, r.class_map, r.instances, r.colors, opacity))
    return overlay, render.class_legend(r.classes, r.colors), counts, [str(p) for p in r.downloads]


def _comparison_view(results: dict, name: str | None):
    """Metrics, note and TP/FP/FN overlay of the result's own comparison; empty without one."""
    comparison = results[name].comparison if results and name in results else None
    if comparison is None:
        return None, "", None
    legend = render.error_legend(comparison.report["classes_merged"])
    note = (comparison.report["note"] + "\n\n" + legend) if comparison.report["note"] else legend
    return (metrics_rows(comparison.report), note,
            render.enlarged(render.error_overlay(results[name].display, comparison.errors)))


def _switch(results: dict, name: str | None, opacity: float):
    """Another image chosen: its result and its own comparison, never the previous image's."""
    return (*_view(results, name, opacity), *_comparison_view(results, name))


def _inputs_column(store: ModelStore) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.files = gr.File(label="Images (PNG, JPEG, TIFF) or small whole slides (SVS, NDPI, ...)", file_count="multiple",
                       file_types=[*IMAGE_SUFFIXES, *SLIDE_SUFFIXES], elem_id="images")
    ui.region = gr.Textbox(label="region x,y,w,h (px of each image, level 0 of a slide; the same for every file uploaded; empty = all of it)",
                           elem_id="region")
    ui.sample = gr.Dropdown(list(SAMPLE_FILES), value=None, label="or a shipped sample", elem_id="sample")
    ui.model = gr.Dropdown(store.names(), value=DEFAULT_MODEL, label="model", elem_id="model")
    ui.pixel_size = gr.Number(value=None, label="pixel size (µm/px; 0 = what the file records): the model sees the image at its own pixel size, areas in µm²", minimum=0,
                              elem_id="pixel-size")
    ui.threshold = gr.Slider(0, 0.95, value=0, step=0.01, label="nucleus threshold (0 = the model's own)",
                             elem_id="threshold")
    ui.marker = gr.Slider(0, 0.95, value=0, step=0.05, elem_id="marker",
                          label="marker threshold: where the distance map seeds a nucleus; higher splits touching "
                                "nuclei more, too high loses faint ones (0 = the model's own)")
    # 0 = the model's own, as for the thresholds (Gradio shows an empty number as 0); 1 keeps every nucleus
    ui.min_nucleus = gr.Number(value=0, minimum=0, precision=0, elem_id="min-nucleus",
                               label="min nucleus (px at the model's pixel size; 0 = the model's own, 1 keeps all)")
    ui.tta = gr.Checkbox(value=False, label="test-time flips (4x slower, a little more accurate)")
    with gr.Row():
        ui.segment = gr.Button("Segment", variant="primary", elem_id="segment")
        ui.cancel = gr.Button("Cancel", elem_id="cancel")
    ui.status = gr.Markdown("", elem_id="status", min_height=70)  # room for the run's progress bar
    ui.gt = gr.File(label="ground truth (label TIFF/PNG: class map, mask or nucleus ids)",
                    file_types=[".png", ".tif", ".tiff"], elem_id="ground-truth")
    ui.compare = gr.Button("Compare with ground truth", elem_id="compare")
    return ui


def _results_column(ui: SimpleNamespace) -> None:
    ui.shown = gr.Dropdown([], label="image", elem_id="shown")
    ui.overlay = gr.Image(label="classes and nucleus outlines", type="numpy", elem_id="overlay", format="png",
                          interactive=False, height=520)
    ui.opacity = gr.Slider(0, 1, value=0.4, step=0.05, label="fill opacity", elem_id="opacity")
    ui.legend = gr.HTML(elem_id="legend")
    ui.counts = gr.Dataframe(headers=COUNT_HEADERS, label="nuclei per class", elem_id="counts", interactive=False)
    ui.metrics = gr.Dataframe(headers=METRIC_HEADERS, label="metrics against the ground truth", elem_id="metrics",
                              interactive=False)
    ui.note = gr.Markdown("", elem_id="metrics-note")
    ui.errors = gr.Image(label="TP / FP / FN against the ground truth", type="numpy", format="png",
                         interactive=False, elem_id="errors", height=520)
    ui.downloads = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="downloads")


@_user_errors
def _pick_sample(choice):
    if not choice:
        return None
    return [shutil.copy(SAMPLES / SAMPLE_FILES[choice], results_folder())]  # served from a temp copy only


def _run(store: ModelStore):
    @_user_errors
    def run(files_in, model_name, px, thr, flips, opacity, region, marker, min_nucleus, previous,
            request: gr.Request, progress=gr.Progress()):
        given = Thresholds(None, marker or None, int(min_nucleus) if min_nucleus else None)  # 0: the model's own
        cancel = _cancel_event(request, fresh=True)
        try:
            done = segment_uploads(store, model_name, _upload_paths(files_in), thr or None, flips, px or None,
                                   lambda label: lambda d, t: progress(d / t if t else 0, desc=label),  # a share: a
                                   # slide's units are thousandths of blocks ('1.4k/9.0k steps' read as nothing)
                                   region.strip() or None, given.overrides(), should_cancel=cancel.is_set)
        except Cancelled:
            return (gr.skip(),) * 6 + ("Cancelled: nothing new; the results shown are the earlier ones.",) + \
                (gr.skip(),) * 3
        remove_results(previous)  # the session's earlier downloads: replaced, not kept on the server
        results = done.results
        first = next(iter(results))
        found = sum(len(r.table["label"]) for r in results.values())
        message = f"Segmented {counted(len(results), 'image')}: {counted(found, 'nucleus', 'nuclei')}."
        notes = [f"{name}: {note}" for name, r in results.items() for note in r.notes]
        refused = [f"**Not segmented**, {name}: {why}" for name, why in done.refused.items()]
        message = "\n\n".join([message, *refused, *notes])
        return (results, gr.Dropdown(choices=list(results), value=first), *_view(results, first, opacity), message,
                None, "", None)
    return run


@_user_errors
def _check(gt_file, name, state):
    if not state:
        raise MedsegError("Segment an image first.")
    if not gt_file:
        raise MedsegError("Upload a ground-truth label map first.")
    result = state[name]
    comparison = compare_upload(result, _upload_paths(gt_file)[0])
    result.downloads = [p for p in result.downloads if p != comparison.metrics_csv] + [comparison.metrics_csv]
    return (*_comparison_view(state, name), [str(p) for p in result.downloads])


def build_app(store: ModelStore) -> gr.Blocks:
    with gr.Blocks(title="napari-medseg", analytics_enabled=False,
                   delete_cache=(GRADIO_CACHE_SECONDS, GRADIO_CACHE_SECONDS)) as app:
        # each session's results; their download folders go with the session
        results = gr.State({}, delete_callback=remove_results)
        gr.Markdown(SUBTITLE)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                ui = _inputs_column(store)
            with gr.Column(scale=2):
                _results_column(ui)
        view = [ui.overlay, ui.legend, ui.counts, ui.downloads]
        comparison = [ui.metrics, ui.note, ui.errors]
        ui.sample.change(_pick_sample, ui.sample, ui.files)
        ui.segment.click(_run(store), [ui.files, ui.model, ui.pixel_size, ui.threshold, ui.tta, ui.opacity, ui.region,
                                       ui.marker, ui.min_nucleus, results],
                         [results, ui.shown, *view, ui.status, *comparison], concurrency_limit=1,
                         show_progress_on=ui.status)  # one progress bar, not one over each of the 10 outputs
        ui.cancel.click(_cancel, None, ui.status, queue=False)  # not behind the run it cancels
        # .input: the user's choice only (a run sets the list with its view already made)
        ui.shown.input(_switch, [results, ui.shown, ui.opacity], [*view, *comparison])
        ui.opacity.release(_view, [results, ui.shown, ui.opacity], view)
        ui.compare.click(_check, [ui.gt, ui.shown, results], [*comparison, ui.downloads], concurrency_limit=1)
        app.unload(_left)
    return app


def serve(host: str = "127.0.0.1", port: int = 7860, models_dir: str | None = None, device: str = "auto",
          block: bool = True, backend: str = "auto"):
    """Start the page (localhost unless told otherwise); returns the Gradio app. ``backend``: who
    runs the network on a CPU, as ``medseg predict --backend`` (auto: the fastest that agrees)."""
    app = build_app(ModelStore(models_dir, device, backend))
    app.queue(max_size=32, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, show_error=True, max_file_size=MAX_UPLOAD,
               prevent_thread_lock=not block, quiet=not block, footer_links=[])
    return app
