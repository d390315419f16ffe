"""Metrics widget: compare a prediction Labels layer with a ground-truth Labels layer, per class."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton, Table

from ..metrics import MetricsInputError, evaluate_pair
from .layers import layer_classes

if TYPE_CHECKING:
    import napari

COLUMNS = ["IoU", "Dice", "Precision", "Recall", "GT pixels", "Pred pixels"]


def _cell(value):
    """Numbers rounded for reading; undefined (NaN) shown as '-'."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else round(value, 4)
    return value


class MetricsWidget(Container):
    def __init__(self, viewer: "napari.viewer.Viewer"):
        super().__init__()
        self._viewer = viewer
        self.prediction = ComboBox(label="prediction", choices=self._labels_layers)
        self.ground_truth = ComboBox(label="ground truth", choices=self._labels_layers)
        self.compute_button = PushButton(text="Compute metrics")
        self.summary = Label(value="")
        self.table = Table(value={"data": [], "index": [], "columns": COLUMNS})
        self.extend([self.prediction, self.ground_truth, self.compute_button, self.summary, self.table])
        self.compute_button.changed.connect(lambda: self.compute())
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        self.reset_choices()
        self.result: dict | None = None

    def _labels_layers(self, _widget=None) -> list:
        from napari.layers import Labels

        return [layer for layer in self._viewer.layers if isinstance(layer, Labels)]

    def _class_names(self, pred_layer, gt_layer, pred: np.ndarray, gt: np.ndarray) -> list[str]:
        gt_names, pred_names = layer_classes(gt_layer), layer_classes(pred_layer)
        if gt_names and pred_names and gt_names != pred_names:
            raise MetricsInputError(
                f"'{pred_layer.name}' has classes {pred_names} but '{gt_layer.name}' has {gt_names}; "
                "compare layers that use the same classes."
            )
        names = gt_names or pred_names
        if names is None:
            top = int(max(gt.max(initial=0), pred.max(initial=0)))
            names = ["background"] + [f"class {i}" for i in range(1, top + 1)]
        return names

    def compute(self) -> dict | None:
        """Fill the table; on bad input show why and leave the previous table as it was."""
        pred_layer, gt_layer = self.prediction.value, self.ground_truth.value
        try:
            if pred_layer is None or gt_layer is None:
                raise MetricsInputError("Choose a prediction and a ground-truth Labels layer.")
            if pred_layer is gt_layer:
                raise MetricsInputError("Prediction and ground truth are the same layer.")
            pred, gt = np.asarray(pred_layer.data), np.asarray(gt_layer.data)
            names = self._class_names(pred_layer, gt_layer, pred, gt)
            result = evaluate_pair(gt, pred, names)
        except MetricsInputError as exc:
            from napari.utils.notifications import show_error

            self.summary.value = f"Error: {exc}"
            show_error(str(exc))
            return None
        rows, index = [], []
        for name, m in result["per_class"].items():
            index.append(name)
            rows.append([_cell(m["iou"]), _cell(m["dice"]), _cell(m["precision"]), _cell(m["recall"]),
                         m["gt_pixels"], m["pred_pixels"]])
        index.append("overall (foreground)")
        rows.append([_cell(result["miou"]), _cell(result["mean_dice"]), "", "", "", ""])
        self.table.value = {"data": rows, "index": index, "columns": COLUMNS}
        self.summary.value = (
            f"mIoU {_cell(result['miou'])} · mean Dice {_cell(result['mean_dice'])} · "
            f"nucleus Dice {_cell(result['binary_dice'])} · pixel accuracy {_cell(result['pixel_accuracy'])}\n"
            "Overall row: mean over foreground classes present in either map."
        )
        self.result = result
        return result
