"""Every architecture the pipeline offers, as ``backbone`` + ``head``.

The split lets one freeze option serve all models (train only the head, then
unfreeze the backbone to fine-tune) and gives Grad-CAM a known layer to look at.
Pretrained weights come the standard torchvision way (the torch hub cache under
``$TORCH_HOME``) or from a local file; a model never falls back silently to random
weights when pretrained ones were asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

from skinlesion import PipelineError
from skinlesion.params import REGISTRY
from skinlesion.untrusted import first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Head(nn.Module):
    """Global average pooling (for feature maps), dense + ReLU, dropout, linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        if hidden:
            self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                     nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        else:
            self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        if extra is not None:
            features = torch.cat([features, extra.to(features.dtype)], dim=1)
        return self.mlp(features)

    @property
    def in_features(self) -> int:
        return next(layer for layer in self.mlp if isinstance(layer, nn.Linear)).in_features


PATIENT_FEATURES = 32  # the patient MLP's output, joined to the pooled image features


class Classifier(nn.Module):
    """``head(backbone(x))``; ``cam_layers`` names the modules whose activations
    Grad-CAM may explain, deepest first (the last spatial feature map, then earlier
    ones with a finer grid, for inputs too small for the last). With ``fuse_patient``
    the head also takes an MLP of the patient's encoded metadata (``forward(images, patient)``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, cam_layers: tuple[str, ...]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cam_layers = tuple(cam_layers)
        self.patient = None
        self.feature_stages: tuple[int, ...] = ()  # see pool_stages

    def fuse_patient(self, width: int, num_classes: int, head: dict) -> None:
        """Feed ``width`` metadata features beside the image. With a dense head: a small
        MLP whose output is joined to the pooled image features before a head built from
        the same ``head`` params (``hidden``, ``dropout``), now ``PATIENT_FEATURES``
        wider. An architecture with its own head (FixCaps' capsules, the ResNet-
        Transformer's token) keeps it, and the MLP adds its own logits to the image's."""
        layers = [nn.Linear(width, PATIENT_FEATURES), nn.ReLU(inplace=True)]
        if isinstance(self.head, Head):
            self.head = Head(self.head.in_features + PATIENT_FEATURES, num_classes, **head)
        else:
            layers.append(nn.Linear(PATIENT_FEATURES, num_classes))
        self.patient = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, patient: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.backbone(images), patient)

    def logits(self, features: torch.Tensor, patient: torch.Tensor | None) -> torch.Tensor:
        if self.patient is None:
            return self.head(features)
        if patient is None:
            raise PipelineError("this model takes the patient's metadata (age, sex, site) beside the image; "
                                "none was given")
        if isinstance(self.head, Head):
            return self.head(features, self.patient(patient))
        return self.head(features) + self.patient(patient)  # a head of its own: the metadata adds logits

    def forward_features(self, images: torch.Tensor, patient: torch.Tensor | None = None):
        """The logits and the pooled image features (the backbone's output averaged over
        its spatial positions or tokens: what the out-of-scope score measures), from one
        pass; with ``feature_stages`` (``pool_stages``), the pooled outputs of those
        backbone stages first, then the last's, side by side."""
        if not self.feature_stages:
            features = self.backbone(images)
            return self.logits(features, patient), pooled(features)
        parts, features = [], images
        for index, stage in enumerate(self.backbone):
            features = stage(features)
            if index in self.feature_stages and index < len(self.backbone) - 1:
                parts.append(pooled(features))
        return self.logits(features, patient), torch.cat([*parts, pooled(features)], dim=1)

    def stages(self) -> tuple[int, ...]:
        """The backbone's top-level stages that hold Grad-CAM's layers (a ResNet's
        layer2 to layer4: strides 8, 16 and 32), for a backbone that is a sequence of
        stages; none for one that is not (a ViT's encoder)."""
        if not isinstance(self.backbone, nn.Sequential):
            return ()
        found = set()
        for name in self.cam_layers:
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "backbone" and parts[1].isdigit():
                found.add(int(parts[1]))
        return tuple(sorted(found))


def pooled(features: torch.Tensor) -> torch.Tensor:
    """N x D: a feature map averaged over its positions, tokens or capsules over theirs."""
    if features.dim() == 4:
        return features.float().mean(dim=(2, 3))
    if features.dim() == 3:
        return features.float().mean(dim=1)
    return features.float().flatten(1)


class Scope(nn.Module):
    """The out-of-scope score of Lee et al. (NeurIPS 2018): the squared Mahalanobis
    distance of an image's pooled features to the nearest class mean, under one
    covariance shared by the classes (both fitted on the train split). Large means far
    from anything the model was trained on. ``whitening`` is W with W W^T the
    precision, so the distance is the sum of squares of ``(features - mean) @ W``: no
    cancellation, the same in float32 on every backend."""

    def __init__(self, means: torch.Tensor, whitening: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("whitening", whitening.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features.float()[:, None, :] - self.means[None]  # N x C x D
        return (centred @ self.whitening).square().sum(dim=-1).amin(dim=1)


# --- pretrained torchvision backbones --------------------------------------------

def tvm():
    """torchvision.models, imported when a torchvision network is built: importing it costs
    a few seconds (it pulls in torch's compiler), which a stage that builds none is spared."""
    import torchvision.models

    return torchvision.models


def torchvision_network(name: str):
    """The builder and the ImageNet weights of torchvision model ``name``."""
    models = tvm()
    return {"resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
            "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
            "efficientnet_b0": (models.efficientnet_b0, models.EfficientNet_B0_Weights.IMAGENET1K_V1),
            "vit_b_16": (models.vit_b_16, models.ViT_B_16_Weights.IMAGENET1K_V1)}[name]


def imagenet_state(name: str, pretrained: bool, weights_path: str | None) -> dict | None:
    """The ImageNet state dict for torchvision model ``name``: from ``weights_path``
    if given, else from the torch hub cache (downloading if needed) if ``pretrained``."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise PipelineError(f"train.weights_path {path} does not exist")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
            raise PipelineError(f"train.weights_path {path} is not a torch state dict ({error})") from None
    if not pretrained:
        return None
    weights = torchvision_network(name)[1]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (URLError, OSError, RuntimeError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PipelineError(
            f"cannot get the ImageNet weights for {name} ({type(error).__name__}: {error}). To fix: "
            f"download {weights.url} and put it at {cache} (the torch hub cache; TORCH_HOME moves it), "
            f"or set train.weights_path to a local copy, or set train.pretrained=false to train from scratch"
        ) from None


def _load(model: nn.Module, state: dict | None, name: str) -> None:
    if state is None:
        return
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = first_line(error)
        raise PipelineError(f"the weights do not fit {name}: {first}") from None


def _resnet_trunk(name: str, pretrained: bool, weights_path: str | None) -> tuple[nn.Sequential, int]:
    model = torchvision_network(name)[0](weights=None)
    _load(model, imagenet_state(name, pretrained, weights_path), name)
    return nn.Sequential(*list(model.children())[:-2]), model.fc.in_features


# --- architectures ---------------------------------------------------------------

def simple_cnn(num_classes, image_size, head, pretrained, weights_path, channels=(32, 64, 128),
               dropout=0.25):
    """The notebooks' baseline: convolution blocks (conv-BN-ReLU, max-pool, dropout)."""
    blocks, previous = [], 3
    for width in channels:
        blocks.append(nn.Sequential(
            nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(dropout)))
        previous = width
    backbone = nn.Sequential(*blocks)
    return Classifier(backbone, Head(previous, num_classes, **head),
                      tuple(f"backbone.{i}.2" for i in reversed(range(len(blocks)))))


# layer4, layer3, layer2 of a torchvision ResNet trunk (strides 32, 16, 8)
RESNET_CAM_LAYERS = ("backbone.7", "backbone.6", "backbone.5")


def _resnet(name):
    def build(num_classes, image_size, head, pretrained, weights_path):
        trunk, features = _resnet_trunk(name, pretrained, weights_path)
        return Classifier(trunk, Head(features, num_classes, **head), RESNET_CAM_LAYERS)
    build.__doc__ = f"torchvision {name}, its fc replaced by the configurable head."
    return build


def efficientnet_b0(num_classes, image_size, head, pretrained, weights_path):
    """torchvision EfficientNet-B0, its classifier replaced by the configurable head."""
    model = tvm().efficientnet_b0(weights=None)
    _load(model, imagenet_state("efficientnet_b0", pretrained, weights_path), "efficientnet_b0")
    # the final 1x1 convolution (stride 32), then the last blocks at strides 16 and 8
    return Classifier(model.features, Head(1280, num_classes, **head), ("backbone.8", "backbone.5", "backbone.3"))


VIT_B = {"layers": 12, "heads": 12, "hidden_dim": 768, "mlp_dim": 3072}


def vit_b_16(num_classes, image_size, head, pretrained, weights_path, **size):
    """torchvision ViT-B/16 at the working size (ImageNet position embeddings are
    interpolated when that is not 224); the class token feeds the head. ``size``
    (layers, heads, hidden_dim, mlp_dim) may shrink it, for training from scratch."""
    if image_size % 16:
        raise PipelineError(f"vit_b_16 needs an image size divisible by 16, not {image_size}; "
                            f"set prepare.image_size")
    unknown = sorted(set(size) - set(VIT_B))
    if unknown:
        raise PipelineError(f"models.vit_b_16: unknown setting(s) {unknown}; expected {', '.join(VIT_B)}")
    size = {**VIT_B, **size}
    if size != VIT_B and (pretrained or weights_path):
        raise PipelineError(f"models.vit_b_16: ImageNet weights exist only for the B/16 size {VIT_B}")
    model = tvm().VisionTransformer(image_size=image_size, patch_size=16, num_layers=size["layers"],
                                    num_heads=size["heads"], hidden_dim=size["hidden_dim"], mlp_dim=size["mlp_dim"])
    state = imagenet_state("vit_b_16", pretrained, weights_path)
    if state is not None and image_size != 224:
        state = tvm().vision_transformer.interpolate_embeddings(image_size, 16, state)
    _load(model, state, "vit_b_16")
    model.heads = nn.Identity()
    # Grad-CAM on a ViT looks at the last block's input norm: tokens there still map to patches.
    last = f"backbone.encoder.layers.encoder_layer_{size['layers'] - 1}.ln_1"
    return Classifier(model, Head(size["hidden_dim"], num_classes, **head), (last,))


class TransformerHead(nn.Module):
    """A ResNet feature map as a token sequence: 1x1 projection, class token and
    learned positions, a Transformer encoder for global context, then the head."""

    def __init__(self, in_channels, grid, num_classes, head, dim, layers, heads, dropout):
        super().__init__()
        self.project = nn.Conv2d(in_channels, dim, 1)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = Head(dim, num_classes, **head)

    def forward(self, features):
        tokens = self.project(features).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.position
        return self.classifier(self.norm(self.encoder(tokens))[:, 0])


def resnet_transformer(num_classes, image_size, head, pretrained, weights_path, backbone="resnet18",
                       dim=256, layers=2, heads=8, dropout=0.1):
    """The ResNet-Transformer hybrid: ResNet for local texture, attention for layout."""
    if backbone not in ("resnet18", "resnet50"):
        raise PipelineError(f"models.resnet_transformer.backbone is '{backbone}'; expected resnet18 or resnet50")
    trunk, features = _resnet_trunk(backbone, pretrained, weights_path)
    grid = math.ceil(image_size / 32)
    return Classifier(trunk, TransformerHead(features, grid, num_classes, head, dim, layers, heads, dropout),
                      RESNET_CAM_LAYERS)


# --- FixCaps ---------------------------------------------------------------------

class CBAM(nn.Module):
    """Convolutional block attention: channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 8, kernel: int = 7):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels // reduction, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x):
        x = x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    norm2 = (s * s).sum(dim, keepdim=True)
    return norm2 / (1 + norm2) * s / torch.sqrt(norm2 + 1e-8)


class PrimaryCaps(nn.Module):
    def __init__(self, in_channels, types, dim, kernel, stride):
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(in_channels, types * dim, kernel, stride)

    def forward(self, x):
        u = self.conv(x)  # B x (types*dim) x H x W
        batch, _, height, width = u.shape
        u = u.view(batch, -1, self.dim, height, width).permute(0, 1, 3, 4, 2).reshape(batch, -1, self.dim)
        return squash(u)


class ClassCaps(nn.Module):
    """Class capsules by dynamic routing; returns log capsule lengths, so softmax
    gives lengths normalised to sum to one and any of our losses applies."""

    def __init__(self, in_caps, in_dim, num_classes, out_dim, iterations):
        super().__init__()
        self.iterations = iterations
        self.weight = nn.Parameter(torch.randn(1, in_caps, num_classes, out_dim, in_dim) * 0.01)

    def forward(self, u):
        u_hat = (self.weight @ u[:, :, None, :, None]).squeeze(-1)  # B x in x classes x out_dim
        logits = torch.zeros(u_hat.shape[:3], device=u.device, dtype=u_hat.dtype)
        detached = u_hat.detach()
        for iteration in range(self.iterations):
            coupling = logits.softmax(dim=2)
            last = iteration == self.iterations - 1
            v = squash((coupling[..., None] * (u_hat if last else detached)).sum(1))
            if not last:
                logits = logits + (detached * v[:, None]).sum(-1)
        return torch.log(v.norm(dim=-1) + 1e-6)


def fixcaps(num_classes, image_size, head, pretrained, weights_path, channels=64, kernel=31, stride=2,
            primary_types=16, primary_dim=8, class_dim=16, routing=3):
    """FixCaps (Lan et al., IEEE Access 2022): a large-kernel convolution, CBAM
    attention, primary capsules and class capsules with dynamic routing. Sizes are
    params; the defaults are scaled down from the paper's 299 px for CPU training."""
    stem = nn.Sequential(nn.Conv2d(3, channels, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True), CBAM(channels), nn.MaxPool2d(2))
    with torch.no_grad():
        side = stem(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    primary_side = (side - 9) // 2 + 1
    if primary_side < 1:
        raise PipelineError(f"fixcaps: image size {image_size} is too small for its layers (try >= 64)")
    backbone = nn.Sequential(stem, PrimaryCaps(channels, primary_types, primary_dim, 9, 2))
    caps = ClassCaps(primary_types * primary_side ** 2, primary_dim, num_classes, class_dim, routing)
    return Classifier(backbone, caps, ("backbone.0.3",))


resnet18 = _resnet("resnet18")
resnet50 = _resnet("resnet50")


def build(name: str, *, num_classes: int, image_size: int, settings: dict, head: dict,
          pretrained: bool = False, weights_path: str | None = None, patient_width: int = 0) -> Classifier:
    """Build architecture ``name`` of the registry (``skinlesion.params.REGISTRY``, which
    names its builder here) with its own ``settings`` (the ``models.<name>`` params) and
    the ``head`` params (``hidden``, ``dropout``); with ``patient_width``, fused with that
    many metadata features."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise PipelineError(f"model is '{name}'; expected one of {', '.join(REGISTRY)}")
    if (pretrained or weights_path) and not entry.pretrained:
        raise PipelineError(f"{name} has no pretrained weights; set train.pretrained=false and train.weights_path=''")
    builder = globals().get(entry.builder)
    if not callable(builder):
        raise PipelineError(f"the registry names '{entry.builder}' as the builder of {name}, and "
                            f"skinlesion/training/models.py has no such function; define it there")
    try:
        model = builder(num_classes, image_size, dict(head), pretrained, weights_path or None, **(settings or {}))
    except TypeError as error:
        raise PipelineError(f"models.{name}: {error}") from None
    if patient_width:
        model.fuse_patient(patient_width, num_classes, dict(head))
    return model


COMBINE = ("probabilities", "logits")


class Ensemble(nn.Module):
    """Members that answer as one model: ``forward`` returns one N x classes tensor that
    the scoring path treats as one model's logits. ``combine``:

    - ``probabilities``: the log of the members' mean softmax. Softmax, logit adjustment
      and temperature then act on the averaged probabilities; for one member it equals
      that member's logits up to a per-image constant, which softmax ignores.
    - ``logits``: the members' mean logits.

    Test-time views reach every member alike (each member sees each view), and Grad-CAM
    explains each member (``skinlesion.evaluation.explain``)."""

    def __init__(self, members: list[nn.Module], combine: str = "probabilities"):
        super().__init__()
        if combine not in COMBINE:
            raise PipelineError(f"ensemble.combine is '{combine}'; expected one of {', '.join(COMBINE)}")
        if not members:
            raise PipelineError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, images: torch.Tensor, patient: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(images, patient)[0]

    def forward_features(self, images: torch.Tensor, patient: torch.Tensor | None = None):
        """The combined logits and the members' pooled features side by side."""
        extra = () if patient is None else (patient,)
        answers = [member.forward_features(images, *extra) for member in self.members]
        logits = torch.stack([member_logits.float() for member_logits, _ in answers])
        features = torch.cat([member_features for _, member_features in answers], dim=1)
        if self.combine == "logits":
            return logits.mean(dim=0), features
        return torch.logsumexp(logits.log_softmax(dim=-1), dim=0) - math.log(len(self.members)), features


FEATURES = ("last", "stages")


def pool_stages(model: nn.Module, features: str) -> None:
    """Which features ``forward_features`` gives every network in ``model``: ``last``,
    the backbone's output pooled; ``stages``, the pooled outputs of its Grad-CAM stages
    too (a ResNet's layer2 to layer4). The out-of-scope score measures them: the early
    stages see colour and texture, which the last one, trained to tell lesions apart,
    can map close to a lesion class (Lee et al. 2018 score several layers likewise)."""
    if features not in FEATURES:
        raise PipelineError(f"the out-of-scope features are '{features}'; expected one of {', '.join(FEATURES)}")
    for network in members_of(model):
        network.feature_stages = network.stages() if features == "stages" else ()


def members_of(model: nn.Module) -> list[nn.Module]:
    """The networks inside ``model``: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def normalise(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """A float batch in 0..255 (N x 3 x H x W) as the models take it: ImageNet-normalised
    and channels-last (see ``channels_last``). Training and inference both go through here."""
    mean = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=batch.device).view(1, 3, 1, 1) * 255
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


def channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights in channels-last layout, on any device: with NHWC input
    (what a uint8 batch becomes after ``permute``) oneDNN and cuDNN both run faster;
    1.2-1.6x per training step on this project's CPU reference machine. Only the
    convolutions are converted: ``Module.to(memory_format=...)`` refuses models with
    5-D parameters such as FixCaps' capsule transforms."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return model
