"""Architecture and packaging promises: a headless core, a valid napari manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def test_core_imports_no_gui_in_a_fresh_interpreter():
    code = (
        "import sys\n"
        "import napari_medseg.io, napari_medseg.io.dataset, napari_medseg.io.pannuke, napari_medseg.io.lazy\n"
        "import napari_medseg.inference.settings, napari_medseg.inference.postprocess, napari_medseg.steps\n"
        "import napari_medseg.models, napari_medseg.inference, napari_medseg.evaluation.semantic\n"
        "import napari_medseg.nuclei.watershed, napari_medseg.nuclei.classical, napari_medseg.nuclei.measure\n"
        "import napari_medseg.training, napari_medseg.evaluation.report, napari_medseg.cli\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the core imported GUI modules: {out.stdout}"


def test_import_linter_contract_holds():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), "import-linter is a test dependency"
    out = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Core stays free of napari, Qt, magicgui and gradio KEPT" in out.stdout
    assert "Layers: faces over training" in out.stdout and "BROKEN" not in out.stdout


def test_npe2_validates_installed_manifest():
    npe2 = Path(sys.executable).parent / "npe2"
    out = subprocess.run([str(npe2), "validate", "napari-medseg"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in (out.stdout + out.stderr).lower()


def test_manifest_commands_point_to_real_callables():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-medseg")
    assert {w.display_name for w in manifest.contributions.widgets} == {"Segment", "Metrics", "Objects", "Train"}
    assert {w.display_name for w in manifest.contributions.writers} == {"QuPath GeoJSON (outlines)", "label TIFF"}
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        mod = __import__(module, fromlist=[attr])
        assert callable(getattr(mod, attr)), command.python_name


def test_packaged_files_are_real_files_in_a_wheel(tmp_path):
    """`pip install .` (not editable) must carry the manifest, the sample data and the default model."""
    if shutil.which("git") is None:
        return
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import zipfile

    wheel = next(tmp_path.glob("napari_medseg-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("napari_medseg/napari.yaml", "napari_medseg/sample_data/consep_train_19_005.png",
                     "napari_medseg/sample_data/README.md", "napari_medseg/models/default/default.safetensors"):
        assert required in names, f"{required} missing from the wheel"
