"""A slide run's per-nucleus table read back: each nucleus id's class, for colouring its outline."""

import numpy as np
import pytest

from napari_medseg.io.slide_outputs import CSVStream, read_nucleus_classes


def _table(path, **columns):
    stream = CSVStream(path, file=path)  # straight to its name (a run renames its temp files)
    stream.add({name: np.asarray(values) for name, values in columns.items()})
    stream.close()
    return path


def test_each_id_gets_its_written_class(tmp_path):
    path = _table(tmp_path / "n.csv", label=[3, 1, 7], class_id=[2, 4, 1], area=[10, 12, 9])
    votes = read_nucleus_classes(path, max_id=100)
    assert votes.tolist() == [0, 4, 0, 2, 0, 0, 0, 1]


def test_no_class_column_a_too_large_id_or_no_row_gives_none(tmp_path):
    assert read_nucleus_classes(_table(tmp_path / "a.csv", label=[1, 2], area=[5, 6]), max_id=100) is None
    assert read_nucleus_classes(_table(tmp_path / "b.csv", label=[1, 500], class_id=[1, 2]), max_id=100) is None
    (tmp_path / "c.csv").write_text("label,class_id\n")
    assert read_nucleus_classes(tmp_path / "c.csv", max_id=100) is None


def test_a_failed_rename_leaves_none_of_the_run(tmp_path, monkeypatch):
    """commit is all or none: the third of three renames fails -> the two done go back to their
    temp names, the error names the file, and abort leaves the folder as it was."""
    import os

    import pytest

    from napari_medseg.io.outputs import OutputWriteError
    from napari_medseg.io import slide_outputs
    from napari_medseg.io.slide_outputs import SlideResultFiles

    files = SlideResultFiles(tmp_path, "slide")
    store = files.temp("store")
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    files.temp("classes_tiff").write_bytes(b"tiff")
    files.temp("geojson").write_text("{}")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".geojson"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(slide_outputs.os, "replace", replace)
    with pytest.raises(OutputWriteError, match=r"slide_nuclei\.geojson: No space left"):
        files.commit()
    assert not files.path("store").exists() and not files.path("classes_tiff").exists()
    files.abort()
    assert list(tmp_path.iterdir()) == []


def test_csv_centroids_keep_their_fraction_on_a_wide_slide(tmp_path):
    """x 121002.818 had been written 121003 (6 significant digits): half a pixel off, on the
    very slides whose pixel-centre convention the README insists on."""
    import csv

    path = _table(tmp_path / "w.csv", label=[1], centroid_x=[121002.818], area_um2=[12.3456789])
    row = next(csv.DictReader(open(path)))
    assert float(row["centroid_x"]) == 121002.818 and float(row["area_um2"]) == 12.3456789


def test_geojson_ids_are_unique_to_each_export(tmp_path):
    """Two exports of the same nuclei (two region runs of one slide) imported into one QuPath
    image must not share ids; within one file every nucleus has its own."""
    from napari_medseg.io.geojson import instances_to_geojson

    instances = np.zeros((20, 20), np.int32)
    instances[2:6, 2:6], instances[10:15, 10:15] = 1, 2
    first, second = (instances_to_geojson(instances)["features"] for _ in range(2))
    ids = {f["id"] for f in first}
    assert len(ids) == 2 and not ids & {f["id"] for f in second}


def test_an_aborted_run_removes_the_folders_it_made_and_only_those(tmp_path):
    from napari_medseg.io.slide_outputs import SlideResultFiles, fresh_results_folder

    base = tmp_path / "results"
    folder = fresh_results_folder(base, "slide")
    files = SlideResultFiles(folder, "slide")
    files.temp("csv").write_text("label\n")
    files.abort()
    assert not base.exists()  # made by the run: gone, so the next run is 'slide' again, not 'slide-2'
    assert fresh_results_folder(base, "slide") == folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    files = SlideResultFiles(tmp_path / "mine", "slide")
    files.abort()
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_a_store_that_cannot_be_made_is_named_by_its_final_name(tmp_path, monkeypatch):
    """A slide run makes its zarr store under a hidden temp name: a failure names the store the
    user will look for, and a full disk while its arrays are laid out is an output error too (it
    had escaped as a bare OSError)."""
    import errno

    import zarr

    from napari_medseg.io.outputs import OutputWriteError
    from napari_medseg.io.slide_outputs import create_result_store

    (tmp_path / "blocker").write_text("a file where the results folder should be")
    with pytest.raises(OutputWriteError) as caught:
        create_result_store(tmp_path / "blocker" / ".slide.zarr.part", (64, 64), {"classes": "uint8"}, 32,
                            shown_as=tmp_path / "blocker" / "slide.zarr")
    assert "slide.zarr" in str(caught.value) and ".part" not in str(caught.value)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Group, "create_group", full)
    with pytest.raises(OutputWriteError, match=r"slide\.zarr: No space left on device"):
        create_result_store(tmp_path / ".slide.zarr.part", (64, 64), {"classes": "uint8"}, 32,
                            shown_as=tmp_path / "slide.zarr")
