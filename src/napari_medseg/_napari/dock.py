"""The base of the plugin's tall docks: a form that scrolls inside its dock.

napari docks a widget's ``native``; for a scrollable magicgui container that is the form inside
the scroll area, so a tall form in a short dock was cut off (its buttons out of reach) or grew
the window past the screen. These docks hand napari the scroll area itself.
"""

from __future__ import annotations

from magicgui.widgets import Container

SCROLL_MIN_HEIGHT = 200  # px a dock keeps however many docks share the column


class ScrollingDock(Container):
    def __init__(self, **kwargs):
        super().__init__(scrollable=True, **kwargs)  # docks never push the window past the screen
        self.root_native_widget.setMinimumHeight(SCROLL_MIN_HEIGHT)

    @property
    def native(self):
        """The scroll area round the form (what napari docks)."""
        return self.root_native_widget
