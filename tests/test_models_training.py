"""The training loop: seeded, learns an easy problem, history and callbacks, both tasks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from voxplain.models import build_model, train
from voxplain.models.training import dice_per_case, labels_to_region_channels
from voxplain.models.training_data import InMemoryDataset, parse_size


def _bright_square_data(n=24, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    y = torch.arange(n) % 2
    x[y == 1, :, 4:10, 4:10] += 2.0
    return TensorDataset(x, y)


def _labels_volume(n=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(n, size, size, size, dtype=torch.long)
    lab[:, 3:9, 3:9, 3:9] = 2
    lab[:, 5:7, 5:7, 5:7] = 4
    lab[::2, 4, 4, 4] = 1
    x = torch.randn(n, 4, size, size, size, generator=g) + (lab > 0).float()[:, None]
    return TensorDataset(x, lab)


def test_classify_learns_and_history():
    ds = _bright_square_data()
    seen = []
    torch.manual_seed(0)
    model = build_model("cnn2d", blocks=3, base_width=8, image_size=16)
    history = train(model, ds, ds, epochs=6, batch_size=8, lr=1e-2, seed=0, progress=False,
                    on_epoch_end=seen.append, keep="best")
    assert [r["epoch"] for r in history] == list(range(1, 7)) and len(seen) == 6
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "kept"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    kept = [r for r in history if r["kept"]]
    assert len(kept) == 1 and kept[0]["val_accuracy"] == max(r["val_accuracy"] for r in history)
    assert kept[0]["val_accuracy"] >= 0.9
    assert not model.training and all(p.is_contiguous() for p in model.parameters())


def test_training_is_seeded():
    ds = _bright_square_data()

    def run(seed):
        torch.manual_seed(seed)
        model = build_model("cnn2d", blocks=3, base_width=4, image_size=16)
        history = train(model, ds, None, epochs=2, batch_size=5, seed=seed, progress=False)
        return [r["train_loss"] for r in history], model.state_dict()

    (loss_a, state_a), (loss_b, state_b), (loss_c, _) = run(1), run(1), run(2)
    assert loss_a == loss_b and loss_a != loss_c
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_segment_regions_from_label_maps():
    ds = _labels_volume()
    torch.manual_seed(0)
    model = build_model("unet3d", channels=[4, 8])
    history = train(model, ds, ds, task="segment", epochs=2, batch_size=2, lr=1e-2, progress=False)
    rec = history[-1]
    for key in ("val_dice_ET", "val_dice_TC", "val_dice_WT", "val_dice_mean", "train_loss", "val_loss"):
        assert 0 <= rec[key] and (rec[key] <= 1 or "loss" in key)
    assert rec["kept"]


def test_segment_output_channels_must_match_regions():
    model = build_model("unet3d", channels=[4, 8], out_channels=2)
    with pytest.raises(ValueError, match="3 output channels \\(TC, WT, ET\\)"):
        train(model, _labels_volume(), task="segment", epochs=1, batch_size=2, progress=False)


def test_bad_arguments():
    model = build_model("cnn2d")
    with pytest.raises(ValueError, match="task must be one of"):
        train(model, _bright_square_data(), task="regress")
    with pytest.raises(ValueError, match="keep must be"):
        train(model, _bright_square_data(), keep="last")
    with pytest.raises(ValueError, match="training set is empty"):
        train(model, TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)), progress=False)


def test_region_channels_and_dice():
    lab = torch.tensor([[0, 1, 2, 4]])
    regions = labels_to_region_channels(lab, ["ET", "TC", "WT"])
    assert regions.tolist() == [[[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]]
    pred = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]]])
    true = torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 0]]])
    torch.testing.assert_close(dice_per_case(pred, true), torch.tensor([[2 / 3, 1.0]]))


def test_parse_size():
    assert parse_size("64", 2) == (64, 64) and parse_size("48,56,40", 3) == (48, 56, 40)
    with pytest.raises(ValueError, match="1 or 3 positive sides"):
        parse_size("4,4", 3)


def test_random_patches_seeded_and_tumour_biased():
    from voxplain.models.patches import RandomPatches
    from voxplain.models.training_data import InMemoryDataset

    target = torch.zeros(3, 20, 20, 20)
    target[:, 14:17, 2:5, 9:12] = 1
    base = InMemoryDataset([(torch.randn(4, 20, 20, 20), target)] * 2)

    def draw(seed):
        ds = RandomPatches(base, (8, 8, 8), per_case=10, foreground_fraction=1.0, seed=seed, flip_axes=(0,))
        return [ds[i] for i in range(len(ds))]

    a, b, c = draw(0), draw(0), draw(1)
    assert len(a) == 20 and a[0][0].shape == (4, 8, 8, 8) and a[0][1].shape == (3, 8, 8, 8)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert all(t.sum() > 0 for _, t in a)  # every patch shows tumour with foreground_fraction=1


def test_random_patches_shift_and_intensity_keep_background():
    from voxplain.models.patches import RandomPatches
    from voxplain.models.training_data import InMemoryDataset

    image = torch.zeros(2, 12, 12, 12)
    image[:, 3:9, 3:9, 3:9] = torch.randn(2, 6, 6, 6)
    base = InMemoryDataset([(image, torch.tensor(1))])
    ds = RandomPatches(base, (12, 12, 12), per_case=1, seed=0, shift=2, intensity=0.2)
    draws = [ds[0] for _ in range(20)]
    for x, y in draws:
        assert x.shape == image.shape and int(y) == 1
        # the brain moves by at most 2 voxels per axis and the zero background stays zero
        assert int((x != 0).sum()) == int((image != 0).sum())
    moved = [x for x, _ in draws if not torch.equal(x != 0, image != 0)]
    assert moved, "no draw shifted the image"
    with pytest.raises(ValueError, match="shift must be >= 0"):
        RandomPatches(base, (12, 12, 12), shift=-1)


def test_cosine_schedule_and_its_record():
    from voxplain.models.training import _epoch_lr

    assert _epoch_lr(1e-3, 1, 5, "cosine") == pytest.approx(1e-3)
    assert _epoch_lr(1e-3, 5, 5, "cosine") == pytest.approx(5e-5)
    assert _epoch_lr(1e-3, 3, 5, "constant") == 1e-3
    torch.manual_seed(0)
    model = build_model("cnn2d", blocks=2, image_size=8)
    data = InMemoryDataset([(torch.randn(1, 8, 8), torch.tensor(i % 2)) for i in range(8)])
    history = train(model, data, task="classify", epochs=3, batch_size=4, progress=False, lr_schedule="cosine")
    assert [round(r["lr"], 6) for r in history] == [0.001, 0.000525, 0.00005]
    with pytest.raises(ValueError, match="lr_schedule"):
        train(model, data, epochs=1, progress=False, lr_schedule="step")


def test_heldout_scores_classify_and_segment():
    from voxplain.models.scores import heldout_scores

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.out[x[:, 0, 0, 0].long()] + self.w

    # classification: sample i's output is row i; samples 0 and 1 are right, 2 is wrong
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    data = InMemoryDataset([(torch.full((1, 2, 2), float(i)), torch.tensor(t)) for i, t in enumerate([0, 1, 1])])
    scores = heldout_scores(Fixed(logits), data, "classify", class_names=["a", "b"])
    assert scores["n"] == 3 and scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["per_class"] == {"a": {"n": 1, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5}}
    assert scores["confusion"] == [[1, 0], [1, 1]]
    # segmentation: case 0 has the region (half found), case 1 has none and predicts none
    pred = torch.full((2, 1, 1, 4), -1.0)
    pred[0, 0, 0, :2] = 1.0
    truth = [torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])[None], torch.zeros(1, 1, 1, 4)]
    data = InMemoryDataset([(torch.full((1, 1, 4), float(i)), truth[i].reshape(1, 1, 4)) for i in range(2)])
    scores = heldout_scores(Fixed(pred.reshape(2, 1, 1, 4)), data, "segment", region_names=["WT"])
    assert scores["dice"]["WT"] == {"cases": 1, "mean": pytest.approx(2 / 3), "min": pytest.approx(2 / 3)}
    assert scores["empty"]["WT"] == {"cases": 1, "predicted_empty": 1, "mean_false_voxels": 0.0}


def test_keep_best_breaks_ties_by_validation_loss():
    # every epoch has validation accuracy 1.0 (one class only); the loss keeps falling, so the last epoch wins
    torch.manual_seed(0)
    model = build_model("cnn2d", blocks=2, image_size=8, dropout=0.0)
    data = InMemoryDataset([(torch.randn(1, 8, 8), torch.tensor(0)) for _ in range(8)])
    history = train(model, data, data, task="classify", epochs=3, batch_size=4, lr=1e-2, progress=False, keep="best")
    assert all(r["val_accuracy"] == 1.0 for r in history)
    losses = [r["val_loss"] for r in history]
    assert [r["kept"] for r in history] == [loss == min(losses) for loss in losses]
    assert history[-1]["kept"]
