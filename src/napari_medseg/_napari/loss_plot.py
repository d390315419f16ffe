"""The Train widget's live plot: training and validation loss, and the validation metrics, by epoch."""

from __future__ import annotations

import time

import numpy as np

REDRAW_EVERY_S = 2.0
EPOCH_PAD = 0.25  # room right of the last point: a first epoch's points sit inside the frame

class LossPlot:
    """Training and validation loss (top) and validation mIoU / Dice (bottom), by epoch."""

    def __init__(self, theme: str | None = None):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        # fixed margins: constrained layout took over half of each redraw on the GUI thread
        self.figure = Figure(figsize=(3.6, 3.6))
        self.figure.subplots_adjust(left=0.17, right=0.97, top=0.97, bottom=0.14, hspace=0.08)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
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
        self.draw()

    def add(self, name: str, x: float, y: float) -> None:
        if y is None or not np.isfinite(y):
            return
        xs, ys = self.data[name]
        xs.append(float(x))
        ys.append(float(y))

    def mark_best(self, epoch: int) -> None:
        self.best_marker.set_xdata([epoch, epoch])

    def draw_now_and_then(self) -> None:
        """``draw`` unless the last draw was under ``REDRAW_EVERY_S`` ago: per-batch updates
        would otherwise spend the GUI thread on redrawing (~0.1-0.5 s each)."""
        if time.monotonic() - self._drawn_at >= REDRAW_EVERY_S:
            self.draw()

    def draw(self) -> None:
        """Epochs from 0 to just past the last point (both plots share it), whole epochs ticked;
        the loss scaled to its values."""
        for name, line in self.lines.items():
            line.set_data(*self.data[name])
        self.loss_ax.relim()
        self.loss_ax.autoscale_view(scalex=False)
        last = max((xs[-1] for xs, _ in self.data.values() if xs), default=1.0)
        self.loss_ax.set_xlim(0, max(1.0, last) + EPOCH_PAD)
        self.canvas.draw_idle()
        self._drawn_at = time.monotonic()
