"""Input-size rules of networks: found from the architecture or by probing; symmetric padding and exact crop-back."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR, AttentionUnet, BasicUNet, DynUNet, SegResNet

from tiny_models import classifier, segnet
from voxplain.models.input_size import architecture_rule, input_size_rule, probe_input_multiple
from voxplain.models.unet import RegionUNet

SCAN = (67, 79, 64)  # an ordinary, awkward scan size


def _nets():
    torch.manual_seed(0)
    return {
        "SegResNet": (SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8,
                                blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1)), (8, 8, 8)),
        "DynUNet": (DynUNet(3, 4, 3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                            filters=[2, 4, 4, 8]), (8, 8, 8)),
        "DynUNet-anisotropic": (DynUNet(3, 4, 3, kernel_size=[3, 3, 3], strides=[1, (2, 2, 1), (2, 2, 2)],
                                        upsample_kernel_size=[(2, 2, 1), (2, 2, 2)], filters=[2, 4, 4]), (4, 4, 2)),
        "BasicUNet": (BasicUNet(3, 4, 3, features=(2, 2, 2, 2, 2, 2)), (16, 16, 16)),
        "AttentionUnet": (AttentionUnet(3, 4, 3, channels=(2, 4, 4), strides=(2, 2)), (4, 4, 4)),
    }


@pytest.mark.parametrize("name", list(_nets()))
def test_monai_networks_run_on_an_ordinary_scan_size_after_padding(name):
    model, expected = _nets()[name]
    model.train()  # the probe must hand it back in training mode, BatchNorm statistics untouched
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rule = input_size_rule(model)
    assert rule.source == "architecture" and rule.multiple == expected
    probed = probe_input_multiple(model, in_channels=4)
    # the probe may find a smaller multiple (BasicUNet pads its skip connections: 8 works), never a larger one
    assert all(a % p == 0 for a, p in zip(expected, probed.multiple)), probed.detail
    assert all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    x = torch.randn((1, 4) + SCAN)
    model.eval()
    if name == "SegResNet":
        with pytest.raises(RuntimeError, match="must match the size"):
            with torch.no_grad():
                model(x)  # what the user saw before
    for found in {rule.padded_size(SCAN): rule, probed.padded_size(SCAN): probed}.values():
        padded, box = found.pad(x)
        assert all(n % m == 0 for n, m in zip(padded.shape[2:], found.multiple))
        assert all(0 <= p - n < m for p, n, m in zip(padded.shape[2:], SCAN, found.multiple))
        with torch.no_grad():
            out = model(padded)
        assert box.restore(out).shape == (1, 3) + SCAN
        # symmetric: diff // 2 before, the rest after; the restored map is the scan's own voxels
        torch.testing.assert_close(box.restore(padded), x, rtol=0, atol=0)
        starts = [(p - n) // 2 for p, n in zip(padded.shape[2:], SCAN)]
        assert box.start == tuple(-s for s in starts)
        assert torch.equal(padded[0, 0, starts[0], starts[1], starts[2]], x[0, 0, 0, 0, 0])


def test_unetr_has_a_fixed_size_and_padding_refuses_rather_than_pads():
    model = UNETR(4, 3, img_size=(32, 32, 32), feature_size=4, hidden_size=24, mlp_dim=24, num_heads=2,
                  spatial_dims=3)
    rule = input_size_rule(model)
    assert rule.fixed_size == (32, 32, 32) and rule.multiple is None
    with pytest.raises(ValueError, match=r"accepts only inputs of spatial size \(32, 32, 32\).*sliding window.*--roi "
                                         r"32,32,32"):
        rule.pad(torch.zeros((1, 4) + SCAN))
    same, _ = rule.pad(torch.zeros(1, 4, 32, 32, 32))
    assert same.shape == (1, 4, 32, 32, 32)
    # a probe finds no multiple; it says so, and finds the fixed size when told where to look
    with pytest.raises(ValueError, match="fixed input size"):
        probe_input_multiple(model, in_channels=4, max_multiple=8)
    probed = probe_input_multiple(model, in_channels=4, max_multiple=8, fixed_size_hint=(32, 32, 32))
    assert probed.fixed_size == (32, 32, 32)


def test_probing_an_unknown_network():
    net = segnet(dims=3, in_channels=2, classes=3)  # one 2x max-pool: multiple 2
    rule = input_size_rule(net)
    assert rule.source == "probe" and rule.multiple == (2, 2, 2)
    padded, box = rule.pad(torch.randn(1, 2, 7, 8, 9))
    assert padded.shape == (1, 2, 8, 8, 10)
    assert input_size_rule(classifier(dims=2), spatial_dims=2).multiple == (1, 1)
    assert input_size_rule(RegionUNet(channels=(4, 8))).multiple == (1, 1, 1)


def test_override_and_bad_overrides():
    net = segnet(dims=3)
    assert input_size_rule(net, pad_multiple=16).multiple == (16, 16, 16)
    assert input_size_rule(net, pad_multiple=(16, 16, 4)).padded_size((67, 79, 5)) == (80, 80, 8)
    for bad in (0, (16, 16), 2.5, True):
        with pytest.raises(ValueError, match="pad_multiple"):
            input_size_rule(net, pad_multiple=bad)
    assert architecture_rule(net) is None
