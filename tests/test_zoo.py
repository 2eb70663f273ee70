"""fastml.zoo: the standard architectures bench/bench_zoo.py patches. Each matches torchvision's
published parameter count, and fastml.patch leaves its outputs and gradients as they were."""

from __future__ import annotations

import copy

import pytest
import torch

import fastml
from fastml import zoo

# torchvision's published parameter counts (1000 classes)
PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg11": 132_863_336, "vgg11_bn": 132_868_840,
              "alexnet": 61_100_840, "mobilenet_v2": 3_504_872, "squeezenet1_1": 1_235_496, "googlenet": 6_624_904,
              "densenet121": 7_978_856, "shufflenet_v2_x1_0": 2_278_604, "regnet_y_400mf": 4_344_144,
              "efficientnet_b0": 5_288_548}


def test_the_zoo_is_the_twelve():
    assert set(zoo.MODELS) == set(PARAMETERS)


@pytest.mark.parametrize("name", PARAMETERS)
def test_parameter_count_and_output(name):
    model = zoo.build(name, num_classes=10).eval()
    head = {"alexnet": 4096, "vgg11": 4096, "vgg11_bn": 4096, "squeezenet1_1": 512, "mobilenet_v2": 1280,
            "efficientnet_b0": 1280, "densenet121": 1024, "googlenet": 1024, "shufflenet_v2_x1_0": 1024,
            "regnet_y_400mf": 440, "resnet18": 512, "resnet50": 2048}[name]
    # the same model with 1000 classes, counted without building it: the head differs by (1000 - 10) classes
    per_class = head + 1
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name] - 990 * per_class
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; choose from resnet18"):
        zoo.build("resnet19")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet1_1",
                                  *(pytest.param(name, marks=pytest.mark.slow)
                                    for name in ("shufflenet_v2_x1_0", "regnet_y_400mf", "googlenet", "densenet121",
                                                 "efficientnet_b0", "alexnet"))])
def test_patched_model_matches_unpatched_in_float64(name):
    """Outputs (eval) and every gradient (train) of the patched model equal the original's."""
    torch.manual_seed(0)
    original = zoo.build(name, num_classes=7).double()
    patched = copy.deepcopy(original)
    report = fastml.patch(patched)
    assert report.replaced
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    original.eval(), patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), original(x), rtol=1e-9, atol=1e-10)
    original.train(), patched.train()
    for model in (original, patched):
        torch.manual_seed(1)  # the same dropout masks
        model(x).square().sum().backward()
    for (key, a), (_, b) in zip(original.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-9, msg=key)


def test_the_benchs_list_of_the_zoos_convolutions():
    """bench's zoo_conv2d cases: every distinct convolution of the zoo, once, named by where it first
    appears (found on the meta device)."""
    from fastml._bench import zoo_conv_shapes

    shapes = zoo_conv_shapes(2, 64)
    keys = [(c["input"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"], c["groups"], c["bias"])
            for _, c in shapes]
    assert len(keys) == len(set(keys))
    where = dict(shapes)
    assert where["resnet18:conv1"]["input"] == (2, 3, 64, 64) and where["resnet18:conv1"]["kernel_size"] == (7, 7)
    assert any(c["groups"] == c["input"][1] > 1 for _, c in shapes)  # depthwise (MobileNet)
    assert {w.split(":")[0] for w, _ in shapes} == set(zoo.MODELS) - {"vgg11_bn"}  # VGG-11-BN's are VGG-11's
