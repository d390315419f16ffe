"""A checkpoint holds what the network uses: smp builds every encoder stage whatever
``encoder_depth`` says, and a ResNet18 U-Net of depth 3 (configs/smoke.yaml) saved 45.6 MB of
which 42 were its unused layer3 and layer4. Checkpoints and resume files written with them still
load. Real CoNSeP patches, tiny models, CPU."""

from __future__ import annotations

import pytest
import torch

from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, load_checkpoint, save_checkpoint
from napari_medseg.training import EpochDone, load_train_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1", "data.val_fraction=0.34"]
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


def full_network(cfg: ModelConfig) -> torch.nn.Module:
    """The network as it was built before the unused stages were removed."""
    try:
        return build_model(cfg, keep_unused=True)
    except TypeError:  # the code before the removal builds them anyway
        return build_model(cfg)


def test_a_depth_3_resnet18_run_saves_the_layers_it_uses_only(small_consep, tmp_path):
    done = train(tiny_config(small_consep, tmp_path / "run", "epochs=1"))
    best = done.checkpoint
    size = best.stat().st_size
    assert size < 5e6, f"{size / 1e6:.1f} MB"  # 45.6 MB with layer3 and layer4
    from safetensors.torch import load_file

    keys = load_file(str(best)).keys()
    assert not any(k.startswith(("encoder.layer3.", "encoder.layer4.")) for k in keys)
    assert any(k.startswith("encoder.layer2.") for k in keys)
    # the resume file holds the used weights too (with their Adam moments)
    assert done.resume.stat().st_size < 15e6
    model, meta = load_checkpoint(best)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, len(CLASSES), 64, 64) and torch.isfinite(out).all()


def test_a_checkpoint_saved_with_the_unused_layers_still_loads_and_segments_the_same(tmp_path, real_512):
    cfg = ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3)
    torch.manual_seed(0)
    old = full_network(cfg).eval()
    assert any(k.startswith("encoder.layer4.") for k in old.state_dict())
    path = tmp_path / "old.safetensors"
    from napari_medseg.models.weights import write_safetensors
    from napari_medseg.models.checkpoint import METADATA_KEY

    meta = CheckpointMeta(model=cfg, classes=CLASSES)
    write_safetensors({k: v.contiguous() for k, v in old.state_dict().items()}, path,
                      {METADATA_KEY: meta.to_json()}, path)
    loaded, _ = load_checkpoint(path)
    image = torch.from_numpy(real_512[:128, :128].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert torch.equal(loaded(image), old(image))
    # and saved again, it keeps the used weights only
    again = save_checkpoint(tmp_path / "again.safetensors", loaded, meta)
    assert again.stat().st_size < path.stat().st_size / 5
    with torch.no_grad():
        assert torch.equal(load_checkpoint(again)[0](image), old(image))


def test_a_seed_makes_the_same_weights_as_before_the_removal():
    cfg = ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3)
    torch.manual_seed(3)
    old = full_network(cfg).state_dict()
    torch.manual_seed(3)
    new = build_model(cfg).state_dict()
    assert all(torch.equal(v, old[k]) for k, v in new.items())


def test_an_older_resume_file_with_the_unused_layers_resumes_exactly(small_consep, tmp_path, monkeypatch):
    """A run interrupted under the code that kept the unused layers (simulated: the removal
    switched off) resumes under this one to the weights of an uninterrupted run."""
    import napari_medseg.models.registry as registry

    if not hasattr(registry, "remove_unused_encoder_modules"):
        pytest.skip("the code before the removal: nothing to convert")
    extra = ("epochs=2", "data.val_fraction=0", "schedule=cosine")
    whole = train(tiny_config(small_consep, tmp_path / "whole", *extra))

    epochs_done = []

    def note(update):
        if isinstance(update, EpochDone):
            epochs_done.append(update.epoch)

    with monkeypatch.context() as patch:
        patch.setattr(registry, "remove_unused_encoder_modules", lambda model, in_channels: [])
        cut = train(tiny_config(small_consep, tmp_path / "cut", *extra), on_update=note,
                    should_stop=lambda: bool(epochs_done))
    from safetensors.torch import load_file

    assert cut.reason == "stopped by user"
    assert any(k.startswith("model.encoder.layer4.") for k in load_file(str(cut.resume)))
    resumed = train(tiny_config(small_consep, tmp_path / "cut", *extra, f"resume={cut.resume}"))
    a, b = load_file(str(whole.resume)), load_file(str(resumed.resume))
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and all(torch.equal(a[k], b[k]) for k in model_keys)
