"""The browser front (``medseg web``): a thin Gradio face over the same core as the napari widgets.

``session`` holds what the page does, free of Gradio (unit-tested); ``render`` draws the
overlays; ``app`` is the page. Gradio is an optional extra: ``pip install "napari-medseg[web]"``.
"""
