"""The Train widget's live plot: training and validation loss, and the validation metrics, by epoch.

matplotlib lays out and rasterises text for every redraw (0.1-0.5 s for this figure), so the
figure is drawn by Agg on a thread of its own from a copy of the data; the GUI thread only
paints the finished picture.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import QSize, Signal
from qtpy.QtGui import QImage, QPainter
from qtpy.QtWidgets import QSizePolicy, QWidget

REDRAW_EVERY_S = 2.0
EPOCH_PAD = 0.25  # room right of the last point: a first epoch's points sit inside the frame
DPI = 100
FIGURE_INCHES = 3.6  # the figure's size before the dock gives it one
MIN_HEIGHT_PX = 260
MIN_LOSS_SPAN = 0.1  # the loss axis spans at least this: its ticks keep two decimals

class LossPlot:
    """Training and validation loss (top) and validation mIoU / Dice (bottom), by epoch."""

    def __init__(self, theme: str | None = None):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # fixed margins: constrained layout doubled the cost of each redraw
        self.figure = Figure(figsize=(FIGURE_INCHES, FIGURE_INCHES), dpi=DPI)
        self.figure.subplots_adjust(left=0.17, right=0.97, top=0.97, bottom=0.14, hspace=0.08)
        FigureCanvasAgg(self.figure)
        self.canvas = PlotView(self)  # the Qt widget that shows the drawn figure
        self._lock = threading.Lock()  # guards _wanted, the latest drawing asked for, and _canvas_gone
        # the view deleted (the viewer closed mid-run): the drawing thread must not emit into it.
        # Checked and set under _lock, so the view's destruction waits for an emit under way: an
        # emit racing the deletion had crashed Python (SIGSEGV), not raised RuntimeError
        self._canvas_gone = False
        self.canvas.destroyed.connect(self._forget_canvas)
        self._wanted: tuple | None = None
        self._drawing = None  # the future of the drawing thread's current run
        self._busy = False  # a drawing run is on and will take any new request (under _lock)
        self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-loss-plot")
        self._blank: _Picture | None = None  # the empty axes, kept: every run starts with them
        self.loss_ax, self.metric_ax = self.figure.subplots(2, 1, sharex=True)
        self.lines = {
            # small dots as well as the line: one batch of a short run is a point, not nothing
            "batch_loss": self.loss_ax.plot([], [], ".-", lw=0.8, ms=2.5, alpha=0.6, color="tab:blue",
                                            label="batch")[0],
            "train_loss": self.loss_ax.plot([], [], "o-", ms=3, color="tab:blue", label="train")[0],
            "val_loss": self.loss_ax.plot([], [], "o-", ms=3, color="tab:orange", label="validation")[0],
            "miou": self.metric_ax.plot([], [], "o-", ms=3, color="tab:green", label="mIoU")[0],
            "mean_dice": self.metric_ax.plot([], [], "o-", ms=3, color="tab:purple", label="mean class Dice")[0],
            "bpq": self.metric_ax.plot([], [], "o-", ms=3, color="tab:red", label="bPQ")[0],
        }
        self.loss_ax.set_ylabel("loss")
        self.metric_ax.set_ylabel("validation")
        self.metric_ax.set_xlabel("epoch")
        self.metric_ax.set_ylim(0, 1)
        self.loss_ax.margins(y=0.15)  # points at the lowest and highest loss stay whole
        from matplotlib.ticker import MaxNLocator

        self.metric_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (self.loss_ax, self.metric_ax):
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="x-small")
            ax.tick_params(labelsize="small")
        self.best_marker = self.loss_ax.axvline(np.nan, color="grey", ls=":", lw=1)
        self._drawn_at = 0.0
        self._apply_theme(theme)
        self.clear()

    def _apply_theme(self, theme: str | None) -> None:
        """napari's panel colours (dark or light) instead of matplotlib's white."""
        try:
            from napari.utils.theme import get_theme

            colors = get_theme(theme or "dark")
            back, text, grid = colors.background.as_hex(), colors.text.as_hex(), colors.primary.as_hex()
        except Exception:  # noqa: BLE001 - an unknown theme keeps matplotlib's look
            return
        self.figure.set_facecolor(back)
        for ax in (self.loss_ax, self.metric_ax):
            ax.set_facecolor(back)
            ax.tick_params(colors=text)
            ax.xaxis.label.set_color(text)
            ax.yaxis.label.set_color(text)
            for spine in ax.spines.values():
                spine.set_color(grid)
            legend = ax.get_legend()
            legend.get_frame().set_facecolor(back)
            legend.get_frame().set_edgecolor(grid)
            for t in legend.get_texts():
                t.set_color(text)

    def clear(self) -> None:
        self.data = {name: ([], []) for name in self.lines}
        self.best_epoch = np.nan
        self.draw()

    def add(self, name: str, x: float, y: float) -> None:
        if y is None or not np.isfinite(y):
            return
        xs, ys = self.data[name]
        xs.append(float(x))
        ys.append(float(y))

    def mark_best(self, epoch: int) -> None:
        self.best_epoch = float(epoch)

    def draw_now_and_then(self) -> None:
        """``draw`` unless the last draw was under ``REDRAW_EVERY_S`` ago: per-batch updates
        would otherwise spend the GUI thread on redrawing (~0.1-0.5 s each)."""
        if time.monotonic() - self._drawn_at >= REDRAW_EVERY_S:
            self.draw()

    def draw(self) -> None:
        """Ask for the figure with the data so far, at the view's size; drawn on the plot's
        thread (a newer request replaces one not yet started)."""
        data = {name: (list(xs), list(ys)) for name, (xs, ys) in self.data.items()}
        size, blank = self.canvas.pixel_size(), self._blank
        if not any(xs for xs, _ in data.values()) and blank is not None and blank.size == size:
            # a new run's empty axes: the picture drawn before, not a drawing that would compete
            # for the GIL with the model being built
            self.canvas.show_image(blank.image)
            return
        with self._lock:
            self._wanted = (data, self.best_epoch, size)
            if not self._busy:  # else the running drawing takes this request before it stops
                self._busy = True
                self._drawing = self._drawer.submit(self._draw_wanted)
        self._drawn_at = time.monotonic()

    def join(self, timeout: float = 30.0) -> None:
        """Wait until every drawing asked for is done (tests; closing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                drawing = self._drawing
            if drawing is None or drawing.done():
                return
            drawing.result(timeout=max(0.0, deadline - time.monotonic()))

    def _draw_wanted(self) -> None:
        """On the plot's thread: draw the latest request until none is left."""
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None:
                    self._busy = False
                    return
            try:
                image = self._render(*wanted)
            except BaseException:
                with self._lock:
                    self._busy = False  # the next request starts a new drawing
                raise
            data, _, size = wanted
            if not any(xs for xs, _ in data.values()):
                self._blank = _Picture(image, size)
            with self._lock:
                if self._canvas_gone:
                    self._busy = False
                    return
                try:
                    self.canvas.drawn.emit(image)
                except RuntimeError:  # the widget was closed while drawing
                    self._busy = False
                    return

    def _forget_canvas(self, *_) -> None:
        """On the GUI thread, as the view is deleted: no drawing reaches it any more."""
        with self._lock:
            self._canvas_gone = True

    def _render(self, data: dict, best_epoch: float, size: tuple[int, int]) -> QImage:
        """Epochs from 0 to just past the last point (both plots share it), whole epochs ticked;
        the loss scaled to its values. Returns the picture as a QImage (safe off the GUI thread)."""
        for name, line in self.lines.items():
            line.set_data(*data[name])
        if any(data[name][0] for name in ("batch_loss", "train_loss", "val_loss")):
            self.loss_ax.set_autoscaley_on(True)
            self.loss_ax.relim()
            self.loss_ax.autoscale_view(scalex=False)
            low, high = self.loss_ax.get_ylim()
            if high - low < MIN_LOSS_SPAN:  # close losses (a fine-tune): ticks of 3 decimals pushed the label out
                low = max(0.0, (low + high - MIN_LOSS_SPAN) / 2)
                self.loss_ax.set_ylim(low, low + MIN_LOSS_SPAN)
        else:  # no loss yet: 0 to 1, not matplotlib's -0.05 to 0.05, whose '-0.04' pushed the label out
            self.loss_ax.set_ylim(0, 1)
        last = max((xs[-1] for xs, _ in data.values() if xs), default=1.0)
        self.loss_ax.set_xlim(0, max(1.0, last) + EPOCH_PAD)
        self.best_marker.set_xdata([best_epoch, best_epoch])
        width, height = size
        self.figure.set_size_inches(width / DPI, height / DPI)
        self.figure.canvas.draw()
        rgba = np.asarray(self.figure.canvas.buffer_rgba())
        return QImage(rgba.tobytes(), rgba.shape[1], rgba.shape[0], QImage.Format.Format_RGBA8888).copy()


@dataclass(frozen=True)
class _Picture:
    image: QImage
    size: tuple[int, int]


class PlotView(QWidget):
    """Shows the latest picture of the figure; a new size asks the plot to draw again."""

    drawn = Signal(object)  # emitted by the drawing thread; Qt queues it to the GUI thread

    def __init__(self, plot: LossPlot):
        super().__init__()
        self._plot, self._image = plot, None
        self.setMinimumHeight(MIN_HEIGHT_PX)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.drawn.connect(self.show_image)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(round(FIGURE_INCHES * DPI), round(FIGURE_INCHES * DPI))

    def pixel_size(self) -> tuple[int, int]:
        ratio = self.devicePixelRatioF()
        return max(1, round(self.width() * ratio)), max(1, round(self.height() * ratio))

    def show_image(self, image: QImage) -> None:
        image.setDevicePixelRatio(self.devicePixelRatioF())
        self._image = image
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if self._image is not None:
            painter = QPainter(self)
            painter.drawImage(self.rect(), self._image)  # stretched until the drawing at this size lands
            painter.end()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._plot.draw()
