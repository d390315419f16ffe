"""The napari face of napari-medseg: reader, writers, sample data, widgets, demo. Thin: the work is in the core."""
