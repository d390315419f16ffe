"""napari-medseg: segment, count and check cells in histology and microscopy images.

The core (``io``, ``models``, ``inference``, ``nuclei``, ``evaluation``, ``training``) is plain
Python + PyTorch and never imports napari, Qt or magicgui; the napari face lives in
``napari_medseg._napari``.
"""

__version__ = "0.1.0"
