"""Grad-CAM and Grad-CAM++, and whether the heat map falls on the lesion.

A classifier that scores well by looking at rulers, ink marks or skin shows it
here: the share of heat-map energy inside the lesion mask, and the pointing game
(is the hottest pixel on the lesion), per class and overall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from skinlesion import PipelineError
from skinlesion.modelinfo import ModelInfo
from skinlesion.training import devices
from skinlesion.untrusted import first_line


def _as_map(tensor: torch.Tensor) -> torch.Tensor:
    """B x C x H x W feature maps; a ViT's B x (1+T) x D tokens become B x D x h x w."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() == 3:
        tokens = tensor[:, 1:, :]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise PipelineError(f"cannot lay {tokens.shape[1]} tokens out as a square grid")
        return tokens.transpose(1, 2).reshape(len(tensor), -1, side, side)
    raise PipelineError(f"Grad-CAM layer output has shape {tuple(tensor.shape)}; expected a feature map")


MIN_GRID = 4
"""Grad-CAM explains the deepest layer the model names whose map is at least this
many cells on a side: ResNet-18's last block at 128 px (4 x 4), the one before it at
64 px, where the last is 2 x 2 and its upsampled maximum always lies in a corner."""


def heatmaps(model, images: torch.Tensor, *, method: str = "gradcam", target: torch.Tensor | None = None,
             patient: torch.Tensor | None = None, amp: torch.dtype | None = None) -> tuple[np.ndarray, torch.Tensor, str]:
    """Heat maps in [0, 1] of the images' own size (N x H x W), for class ``target``
    (default: the predicted class), from the deepest of the model's ``cam_layers``
    whose map has ``MIN_GRID`` cells a side (or else the finest of them); ``amp``: the
    autocast dtype of the forward pass (None: float32), the maps themselves in float32.
    Returns the maps, the logits and the layer's name."""
    modules = dict(model.named_modules())
    missing = [name for name in model.cam_layers if name not in modules]
    if missing:
        raise PipelineError(f"the model has no layer {missing[0]} for Grad-CAM")
    captured: dict[str, dict[str, torch.Tensor]] = {name: {} for name in model.cam_layers}

    def hook(name):
        def forward_hook(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            captured[name]["activation"] = output
            output.register_hook(lambda grad: captured[name].__setitem__("gradient", grad))
        return forward_hook

    handles = [modules[name].register_forward_hook(hook(name)) for name in model.cam_layers]
    model.eval()
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # gradients flow even through a frozen backbone
            with devices.autocast(images.device, amp):
                logits = model(images) if patient is None else model(images, patient)
            logits = logits.float()
            if target is None:
                target = logits.argmax(dim=1)
            model.zero_grad(set_to_none=True)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    maps = {name: (_as_map(got["activation"].detach().float()), _as_map(got["gradient"].detach().float()))
            for name, got in captured.items()}
    layer = next((name for name, (activation, _) in maps.items() if min(activation.shape[-2:]) >= MIN_GRID),
                 max(maps, key=lambda name: min(maps[name][0].shape[-2:])))
    activation, gradient = maps[layer]
    if method == "gradcam":
        weights = gradient.mean(dim=(2, 3), keepdim=True)
    else:
        g2, g3 = gradient ** 2, gradient ** 3
        denominator = 2 * g2 + activation.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(gradient != 0, g2 / (denominator + 1e-12), torch.zeros_like(g2))
        weights = (alpha * F.relu(gradient)).sum(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), cam)
    return cam.cpu().numpy(), logits.detach(), layer


def member_heatmaps(model, images: torch.Tensor, *, method: str, target: torch.Tensor,
                    patient: torch.Tensor | None = None, amp: torch.dtype | None = None) -> tuple[np.ndarray, str]:
    """``heatmaps`` for a model or an ensemble: an ensemble's map is the mean of its
    members' maps (each for the ensemble's predicted class, each scaled to a peak of 1),
    scaled to a peak of 1 again. Returns the maps and the (first member's) layer."""
    from skinlesion.training.models import members_of

    networks = members_of(model)
    maps = [heatmaps(network, images, method=method, target=target, patient=patient, amp=amp) for network in networks]
    if len(maps) == 1:
        return maps[0][0], maps[0][2]
    mean = np.mean([cams for cams, _, _ in maps], axis=0)
    peak = mean.reshape(len(mean), -1).max(axis=1).reshape(-1, 1, 1)
    mean = np.where(peak > 0, mean / np.maximum(peak, 1e-12), mean)
    return mean.astype(np.float32), f"mean of {len(networks)} members at {maps[0][2]}"


def lesion_scores(cam: np.ndarray, mask: np.ndarray) -> tuple[float, bool] | None:
    """(share of heat-map energy inside the mask, whether the hottest pixel is on the
    lesion); None for an all-zero heat map, which points nowhere."""
    total = float(cam.sum())
    if total <= 0:
        return None
    energy = float((cam * (mask > 0)).sum() / total)
    hottest = np.unravel_index(int(cam.argmax()), cam.shape)
    return energy, bool(mask[hottest] > 0)


def score_split(model, info: ModelInfo, images: np.ndarray, masks: np.ndarray, has_mask: np.ndarray,
                *, method: str, batch_size: int, keep: set[int] = frozenset(), progress: str | None = None,
                patient: np.ndarray | None = None, device: str | torch.device = "cpu",
                predicted: np.ndarray | None = None):
    """Heat maps for every image (its predicted class, scored as the model file says,
    as target; in the file's precision) and, where a mask exists, its lesion scores.
    Returns per-image rows and the heat maps of the indices in ``keep`` (for overlays).
    ``model`` must be on ``device``. ``predicted``: the classes the evaluate stage
    predicted for these images (``predicted_classes``), so that the test split is not
    scored with every test-time view a second time; without it they are scored here."""
    from skinlesion.evaluation.inference import TorchPredictor, normalise
    from skinlesion.progress import bar

    predictor = TorchPredictor(model, info, device)
    rows, kept = [], {}
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        pixels = images[start:start + batch_size]
        metadata = None if patient is None else patient[start:start + batch_size]
        batch_predicted = predictor.probabilities(pixels, batch_size=batch_size, patient=metadata).argmax(axis=1) \
            if predicted is None else np.asarray(predicted[start:start + batch_size], dtype=np.int64)
        cams, layer = member_heatmaps(model, normalise(pixels, info, device), method=method,
                                      target=torch.from_numpy(batch_predicted).to(device),
                                      patient=None if metadata is None else torch.from_numpy(metadata).to(device),
                                      amp=predictor.amp)
        for offset, cam in enumerate(cams):
            index = start + offset
            scores = lesion_scores(cam, masks[index]) if has_mask[index] else None
            rows.append({"predicted": int(batch_predicted[offset]), "layer": layer,
                         "energy_in_lesion": None if scores is None else scores[0],
                         "pointing_hit": None if scores is None else scores[1]})
            if index in keep:
                kept[index] = cam
    return rows, kept


def predicted_classes(path: Path, image_ids, classes) -> np.ndarray:
    """The predicted class indices that the evaluate stage wrote to ``path`` (its
    ``predictions.csv``) for ``image_ids``, in their order; refused in one line when
    the file is not the evaluation of these images (stale, edited or cut short)."""
    from skinlesion.files import spreadsheet_safe

    hint = "run `dvc repro evaluate` (or `dvc repro explain`, which runs it first)"
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "predicted": str}, keep_default_na=False)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file; explain reads the evaluate stage's predictions; {hint}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        reason = first_line(error)
        raise PipelineError(f"{path}: not a table of predictions ({reason}); {hint}") from None
    missing = {"image_id", "predicted"} - set(table.columns)
    if missing:
        raise PipelineError(f"{path}: no {', '.join(sorted(missing))} column; {hint}")
    expected = spreadsheet_safe(pd.DataFrame({"image_id": list(image_ids)}))["image_id"].tolist()
    if table["image_id"].tolist() != expected:
        raise PipelineError(f"{path} lists {len(table)} images, not the {len(expected)} test images in their order "
                            f"(a stale or edited evaluation); {hint}")
    unknown = sorted(set(table["predicted"]) - set(classes))
    if unknown:
        raise PipelineError(f"{path}: predicted class '{unknown[0]}' is not one of the model's classes "
                            f"({', '.join(classes)}); {hint}")
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[name] for name in table["predicted"]], dtype=np.int64)


def summarise(rows: list[dict], labels: np.ndarray, classes) -> dict:
    """Mean energy share and pointing-game hit rate, per true class and overall."""
    def block(selected):
        scored = [r for r in selected if r["energy_in_lesion"] is not None]
        if not scored:
            return {"images": 0}
        return {"images": len(scored),
                "energy_in_lesion": float(np.mean([r["energy_in_lesion"] for r in scored])),
                "pointing_game": float(np.mean([r["pointing_hit"] for r in scored]))}

    result = {"overall": block(rows), "per_class": {}}
    for index, name in enumerate(classes):
        result["per_class"][name] = block([r for r, label in zip(rows, labels) if label == index])
    return result


def gallery(out, shown: dict[str, list[int]], *, images: np.ndarray, masks: np.ndarray, has_mask: np.ndarray,
            image_ids, scored: list[dict], cams: dict[int, np.ndarray]) -> None:
    """One figure per class under ``out`` (``CLASS.png``): for each index ``shown`` for
    that class, the image beside its heat map over the lesion's outline, captioned with
    the prediction (green right, red wrong) and the heat map's share on the lesion."""
    from skinlesion import CLASSES, plots

    image_ids = list(image_ids)
    for name, chosen in shown.items():
        tiles, captions, colours = [], [], []
        for i in chosen:
            predicted = CLASSES[scored[i]["predicted"]]
            energy = scored[i]["energy_in_lesion"]
            tiles += [images[i], plots.overlay(images[i], cams[i], masks[i] if has_mask[i] else None)]
            captions += [f"{image_ids[i]}\ntrue {name}",
                         f"pred {predicted}\n" + ("no mask" if energy is None else f"in lesion {energy:.0%}")]
            colours += ["black", "darkgreen" if predicted == name else "red"]
        plots.image_grid(np.stack(tiles), captions, colours, out / f"{name}.png", columns=2)
