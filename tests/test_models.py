"""Every architecture builds, runs forward and backward on CPU, and names a real
Grad-CAM layer; pretrained weights load from a local file or fail with advice."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from skinlesion import PipelineError, params
from skinlesion.training import models

HEAD = {"hidden": 32, "dropout": 0.1}
SMALL = {"fixcaps": {"channels": 16, "kernel": 9, "primary_types": 4},
         "vit_b_16": {"layers": 2, "heads": 2, "hidden_dim": 32, "mlp_dim": 64}}


@pytest.mark.parametrize("name", list(params.ARCHITECTURES))
def test_forward_and_backward(name):
    torch.manual_seed(0)
    size = 64 if name == "fixcaps" else 32
    model = models.build(name, num_classes=7, image_size=size, settings=SMALL.get(name, {}), head=HEAD)
    images = torch.randn(3, 3, size, size)
    logits = model(images)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert model.cam_layers and set(model.cam_layers) <= set(dict(model.named_modules()))


@pytest.mark.parametrize("name", list(params.ARCHITECTURES))
def test_channels_last_changes_layout_not_results(name):
    torch.manual_seed(0)
    size = 64 if name == "fixcaps" else 32
    model = models.build(name, num_classes=7, image_size=size, settings=SMALL.get(name, {}), head=HEAD).eval()
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(images)
        models.channels_last(model)
        got = model(images.contiguous(memory_format=torch.channels_last))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(params.ARCHITECTURES))
def test_every_architecture_takes_the_patients_metadata(name):
    # train.metadata is on by default, so `dvc exp run -S model=NAME` must work for all:
    # a dense head joins the metadata features, a head of its own gets their logits added.
    torch.manual_seed(0)
    size = 64 if name == "fixcaps" else 32
    model = models.build(name, num_classes=7, image_size=size, settings=SMALL.get(name, {}), head=HEAD,
                         patient_width=20)
    images, patient = torch.randn(4, 3, size, size), torch.zeros(4, 20)
    patient[:2, 5] = 1  # two patients differ from the other two in one field only
    logits = model(images, patient)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6, 1])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patient.parameters())
    with torch.no_grad():
        model.eval()
        same_image = model(images[:1].expand(2, -1, -1, -1), patient[1:3])
    assert not torch.allclose(same_image[0], same_image[1])  # the metadata moves the answer
    with pytest.raises(PipelineError, match="takes the patient's metadata"):
        model(images)


def test_head_is_configurable():
    model = models.build("simple_cnn", num_classes=7, image_size=32, settings={}, head={"hidden": 0, "dropout": 0.5})
    assert [type(m).__name__ for m in model.head.mlp] == ["Dropout", "Linear"]
    model = models.build("resnet18", num_classes=7, image_size=32, settings={}, head={"hidden": 64, "dropout": 0.2})
    assert [type(m).__name__ for m in model.head.mlp] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.head.mlp[0].in_features == 512


def test_bad_model_names_and_settings():
    with pytest.raises(PipelineError, match="model is 'resnet99'; expected one of simple_cnn, resnet18, resnet50"):
        models.build("resnet99", num_classes=7, image_size=32, settings={}, head=HEAD)
    with pytest.raises(PipelineError, match="models.simple_cnn: .*unexpected keyword argument 'width'"):
        models.build("simple_cnn", num_classes=7, image_size=32, settings={"width": 3}, head=HEAD)
    with pytest.raises(PipelineError, match="vit_b_16 needs an image size divisible by 16, not 40"):
        models.build("vit_b_16", num_classes=7, image_size=40, settings={}, head=HEAD)
    with pytest.raises(PipelineError, match=r"models.vit_b_16: unknown setting\(s\) \['depth'\]"):
        models.build("vit_b_16", num_classes=7, image_size=32, settings={"depth": 3}, head=HEAD)
    with pytest.raises(PipelineError, match="ImageNet weights exist only for the B/16 size"):
        models.build("vit_b_16", num_classes=7, image_size=32, settings={"layers": 2}, head=HEAD, pretrained=True)
    for name in ("simple_cnn", "fixcaps"):  # the registry says which have ImageNet weights
        with pytest.raises(PipelineError, match=f"{name} has no pretrained weights; set train.pretrained=false"):
            models.build(name, num_classes=7, image_size=64, settings={}, head=HEAD, pretrained=True)


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = models.build("resnet_transformer", num_classes=7, image_size=64, settings={}, head=HEAD,
                         weights_path=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.backbone[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone[7][1].conv2.weight, reference.layer4[1].conv2.weight)

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(PipelineError, match="the weights do not fit resnet18"):
        models.build("resnet18", num_classes=7, image_size=64, settings={}, head=HEAD,
                     weights_path=str(tmp_path / "resnet50.pth"))
    with pytest.raises(PipelineError, match="train.weights_path .*nope.pth does not exist"):
        models.build("resnet18", num_classes=7, image_size=64, settings={}, head=HEAD,
                     weights_path=str(tmp_path / "nope.pth"))


@pytest.mark.slow
def test_missing_imagenet_weights_fail_with_the_fix(tmp_path):
    """No cached file and no way to download (proxy pointed at a closed local port):
    the build stops at once and says where to put the file, never trains from random."""
    code = ("from skinlesion.training import models\n"
            "models.build('resnet18', num_classes=7, image_size=64, settings={}, head={'hidden': 0, 'dropout': 0},"
            " pretrained=True)\n")
    env = {"PATH": "/usr/bin:/bin", "TORCH_HOME": str(tmp_path / "torch"), "HOME": str(tmp_path),
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "cannot get the ImageNet weights for resnet18" in message
    assert f"{tmp_path}/torch/hub/checkpoints/resnet18-f37072fd.pth" in message
    assert "train.weights_path" in message and "train.pretrained=false" in message


def test_one_registry_of_architectures_ties_params_builders_and_params_yaml():
    import yaml

    from tests.conftest import PROJECT

    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for entry in params.REGISTRY.values():  # every entry names a builder that exists
        assert callable(getattr(models, entry.builder))
    assert tuple(shipped["models"]) == params.ARCHITECTURES
    assert tuple(params.Models.model_fields) == params.ARCHITECTURES
    for name, entry in params.REGISTRY.items():  # each architecture's settings read by its own type
        params.check(entry.settings, shipped["models"][name], f"models.{name}")
