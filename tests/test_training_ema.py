"""ema_decay: the weights' moving average is what validation scores, the best checkpoint holds and
a resumed run goes on with."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from napari_medseg.training import TrainConfig, TrainConfigError, train
from napari_medseg.training.ema import WeightAverage

from test_resume_exact import same, stop_in_epoch_2, tiny_config, weights


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def test_the_average_follows_the_ema_rule_on_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    net = _net()
    average = WeightAverage(net, 0.9)
    reference = {k: v.clone().float() for k, v in net.state_dict().items()}
    average.update(net)  # the first step copies
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(2, 3, 8, 8))  # moves the running statistics and the step count
        average.update(net)
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                reference[k] = 0.9 * reference[k] + 0.1 * v  # slow, per tensor
            else:
                reference[k] = v.clone()
    for k, v in average.model.state_dict().items():
        if k == "1.num_batches_tracked":
            assert int(v) == int(net.state_dict()[k]) == 3
        else:
            # the first update copied the (unchanged) start, so the reference from it agrees
            torch.testing.assert_close(v.float(), reference[k], rtol=1e-5, atol=1e-6)
    assert average.steps == 4
    assert not any(p.requires_grad for p in average.model.parameters())


def test_the_average_and_its_step_count_round_trip():
    net = _net()
    a = WeightAverage(net, 0.99)
    a.update(net)
    a.update(net)
    tensors, steps = a.state()
    assert all(k.startswith("ema.") for k in tensors) and steps == 2
    b = WeightAverage(_net(), 0.99)
    b.load_state(tensors, steps)
    assert b.steps == 2 and same(b.model.state_dict(), a.model.state_dict())


@pytest.mark.parametrize("value", [1, 1.0, -0.1, True, "fast"])
def test_a_decay_outside_0_to_1_is_refused_before_training(value):
    with pytest.raises(TrainConfigError, match="ema_decay"):
        TrainConfig.from_dict({"ema_decay": value, "data": {"dataset": ["x"]}})


@pytest.mark.usefixtures("one_torch_thread")
def test_the_best_checkpoint_holds_the_average_and_a_resume_goes_on_with_it(small_consep, tmp_path):
    from napari_medseg.models import load_checkpoint

    extra = ("epochs=3", "data.val_fraction=0.34", "data.crops_per_image=2", "ema_decay=0.5")
    whole = train(tiny_config(small_consep, tmp_path / "whole", *extra))
    saved = load_file(str(whole.resume))
    average = {k[len("ema."):]: v for k, v in saved.items() if k.startswith("ema.")}
    trained = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    assert average.keys() == trained.keys()
    # the average is not the last step's weights ...
    assert any(not torch.equal(average[k], trained[k]) for k in trained if trained[k].is_floating_point())
    # ... and the best checkpoint is the average of its epoch: a one-epoch run's is its last
    one = train(tiny_config(small_consep, tmp_path / "one", *extra, "epochs=1"))
    assert one.best_epoch == 1
    one_average = {k[len("ema."):]: v for k, v in load_file(str(one.resume)).items() if k.startswith("ema.")}
    best = load_checkpoint(one.checkpoint)[0].state_dict()
    assert best.keys() == one_average.keys()
    assert all(torch.equal(best[k], one_average[k]) for k in best)
    # stopped in epoch 2 and resumed: the same average and weights as the uninterrupted run
    part = train(tiny_config(small_consep, tmp_path / "part", *extra), should_stop=stop_in_epoch_2())
    resumed = train(tiny_config(small_consep, tmp_path / "part", *extra, f"resume={part.resume}"))
    again = load_file(str(resumed.resume))
    assert same(weights(whole.resume), weights(resumed.resume))
    assert same({k: v for k, v in saved.items() if k.startswith("ema.")},
                {k: v for k, v in again.items() if k.startswith("ema.")})
    assert resumed.best_epoch == whole.best_epoch


@pytest.mark.usefixtures("one_torch_thread")
def test_a_resume_file_from_before_a_setting_existed_still_resumes(small_consep, tmp_path):
    """A setting added since (its default, off) is what the older run had: not a difference."""
    from napari_medseg.training.resume import read_resume, read_resume_for

    extra = ("epochs=2", "data.val_fraction=0.34", "data.crops_per_image=2")
    part = train(tiny_config(small_consep, tmp_path / "part", *extra), should_stop=stop_in_epoch_2())
    tensors, info = read_resume(part.resume)
    given = dict(info["config_given"])
    older = {k: v for k, v in given.items() if k not in ("ema_decay", "distance_touch_weight")}
    older["data"] = {k: v for k, v in given["data"].items() if k != "split_seed"}
    info["config_given"] = older
    from napari_medseg.models.checkpoint import RESUME_KEY
    from napari_medseg.models.weights import write_safetensors
    import json

    write_safetensors(tensors, part.resume, {RESUME_KEY: json.dumps(info)}, part.resume)
    read_resume_for(part.resume, given)  # no difference
    with pytest.raises(Exception, match=r"ema_decay: 0\.0 -> 0\.9"):
        read_resume_for(part.resume, {**given, "ema_decay": 0.9})
