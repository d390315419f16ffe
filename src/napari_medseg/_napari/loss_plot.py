"""The Train widget's live plot: training and validation loss, and the validation metrics, by epoch."""

from __future__ import annotations

import numpy as np


class LossPlot:
    """Training and validation loss (top) and validation mIoU / Dice (bottom), by epoch."""

    def __init__(self, theme: str | None = None):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 3.6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.loss_ax, self.metric_ax = self.figure.subplots(2, 1, sharex=True)
        self.lines = {
            "batch_loss": self.loss_ax.plot([], [], lw=0.6, alpha=0.45, color="tab:blue", label="batch")[0],
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
        for ax in (self.loss_ax, self.metric_ax):
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="x-small")
            ax.tick_params(labelsize="small")
        self.best_marker = self.loss_ax.axvline(np.nan, color="grey", ls=":", lw=1)
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

    def draw(self) -> None:
        for name, line in self.lines.items():
            line.set_data(*self.data[name])
        for ax in (self.loss_ax, self.metric_ax):
            ax.relim()
            ax.autoscale_view(scaley=ax is self.loss_ax)
        self.canvas.draw_idle()
