"""Training: model selection on validation balanced accuracy, never on test.

One epoch = a pass over the (balanced) train split with on-the-fly flips, then a
validation pass. The best epoch by validation balanced accuracy is saved as the
model; a checkpoint after every epoch lets an interrupted run resume exactly where
it stopped (same batches, same random state) instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from skinlesion import CLASSES, PipelineError, losses, modelfile, models
from skinlesion.files import atomic_path
from skinlesion.loader import ArrayLoader, shard
from skinlesion.prepare import Prepared
from skinlesion.progress import bar

log = logging.getLogger(__name__)

TRAIN_KEYS = {
    "pretrained": bool, "weights_path": str, "freeze": bool, "unfreeze_after_epochs": int,
    "epochs": int, "batch_size": int, "optimizer": str, "lr": float, "weight_decay": float,
    "momentum": float, "scheduler": str, "warmup_epochs": int, "loss": str, "class_weights": bool,
    "focal_gamma": float, "label_smoothing": float, "sampler": str, "augment": str,
    "early_stopping_patience": int, "device": str, "deterministic": bool, "seed": int, "head": dict,
    "nproc": int, "precision": str, "ema": float, "select": str, "logit_adjust": float,
}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle", "plateau")
SAMPLERS = ("shuffle", "balanced", "sqrt")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What picks the best epoch (and drives early stopping). Validation has a dozen or two
# images of the rare classes, so balanced accuracy swings by a point per image; macro
# ROC AUC and log-loss use every image's probabilities, not just its argmax.
SELECT = ("macro_auc", "log_loss", "balanced_accuracy")


class Interrupted(Exception):
    """Raised after the checkpoint of the epoch given as ``stop_after``: a stand-in
    for a run cut short, used to test resuming."""


def check_config(train: dict) -> dict:
    """Validate the ``train`` params: every key known, present and of its type."""
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    missing = sorted(set(TRAIN_KEYS) - set(train))
    if unknown or missing:
        raise PipelineError(f"train params: unknown {unknown or 'none'}, missing {missing or 'none'}")
    for key, kind in TRAIN_KEYS.items():
        value = train[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PipelineError(f"train.{key} is {value!r}; expected {kind.__name__}")
    for key, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("sampler", SAMPLERS),
                         ("precision", PRECISIONS), ("select", SELECT)):
        if train[key] not in allowed:
            raise PipelineError(f"train.{key} is '{train[key]}'; expected one of {', '.join(allowed)}")
    if train["epochs"] < 1:
        raise PipelineError(f"train.epochs is {train['epochs']}; expected at least 1")
    if train["nproc"] < 1:
        raise PipelineError(f"train.nproc is {train['nproc']}; expected at least 1")
    if not 0 <= train["ema"] < 1:
        raise PipelineError(f"train.ema is {train['ema']}; expected a decay in [0, 1) (0: off)")
    if train["logit_adjust"] < 0:
        raise PipelineError(f"train.logit_adjust is {train['logit_adjust']}; expected 0 (off) or more")
    return train


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX-512 BF16 or AMX): there, bf16
    autocast nearly doubles a ResNet training step; elsewhere it is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32" or device.type == "mps" and precision == "auto":
        return None
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise PipelineError("train.precision is bf16 but this GPU has no bfloat16; use auto or fp16")
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return torch.bfloat16


# --- data ------------------------------------------------------------------------

@dataclass
class TrainData:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    fingerprint: str

    @property
    def image_size(self) -> int:
        return self.train_images.shape[1]


def load_data(balanced: Path, split: Path, prepared: Path) -> TrainData:
    """The balanced train set and the untouched validation split, decoded, in memory."""
    manifest = pd.read_csv(balanced / "train.csv", dtype={"image_id": str})
    train_images = np.load(balanced / "images.npy")
    val = pd.read_csv(split / "val.csv", dtype={"image_id": str})
    source = Prepared(prepared)
    val_images = np.asarray(source.images[source.rows(val["image_id"])])
    if train_images.shape[1:] != val_images.shape[1:]:
        raise PipelineError(f"data/balanced images are {train_images.shape[1:]}, data/prepared "
                            f"{val_images.shape[1:]}; rerun `dvc repro balance`")
    digest = hashlib.blake2b(digest_size=16)
    for array in (train_images, val_images):
        digest.update(str(array.shape).encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    digest.update(manifest["label"].to_numpy().tobytes())
    digest.update(val["label"].to_numpy().tobytes())
    return TrainData(train_images, manifest["label"].to_numpy(), val_images, val["label"].to_numpy(),
                     digest.hexdigest())


# --- devices and determinism -----------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"train.device is '{name}'; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is cuda but no CUDA GPU is visible; use train.device=auto")
    return device


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


# --- learning-rate schedule ------------------------------------------------------

class Schedule:
    """Per-batch learning rate: linear warm-up, then constant (``none``), cosine decay,
    one-cycle (torch's OneCycleLR, its warm-up from the same param), or reduce-on-
    plateau (halved after 2 epochs without a better validation score)."""

    def __init__(self, optimizer, kind: str, lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int):
        self.optimizer, self.kind, self.lr = optimizer, kind, lr
        self.total = epochs * steps_per_epoch
        self.warmup = min(warmup_epochs * steps_per_epoch, self.total - 1)
        self.step_count, self.factor, self.best, self.stale = 0, 1.0, -math.inf, 0
        self.onecycle = None
        if kind == "onecycle":
            self.onecycle = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=self.total,
                pct_start=max(self.warmup, 1) / self.total, anneal_strategy="cos")
        else:
            self._apply()

    def current(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self) -> None:
        step = self.step_count
        if step < self.warmup:
            lr = self.lr * (step + 1) / (self.warmup + 1)
        elif self.kind == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        else:
            lr = self.lr * self.factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def batch_end(self) -> None:
        self.step_count += 1
        if self.onecycle is not None:
            if self.step_count < self.total:
                self.onecycle.step()
        else:
            self._apply()

    def epoch_end(self, score: float) -> None:
        if self.kind != "plateau" or self.step_count < self.warmup:
            return
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
            if self.stale >= 2:
                self.factor, self.stale = self.factor * 0.5, 0
                log.info("validation score on a plateau: learning rate halved to %.2e", self.lr * self.factor)
        self._apply()

    def state_dict(self) -> dict:
        state = {"step_count": self.step_count, "factor": self.factor, "best": self.best, "stale": self.stale}
        if self.onecycle is not None:
            state["onecycle"] = self.onecycle.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.factor, self.best, self.stale = (state["step_count"], state["factor"],
                                                               state["best"], state["stale"])
        if self.onecycle is not None:
            self.onecycle.load_state_dict(state["onecycle"])


def make_optimizer(name: str, parameters, lr: float, weight_decay: float, momentum: float):
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)


# --- evaluation on validation ----------------------------------------------------

@torch.no_grad()
def predict(model, loader: ArrayLoader, amp) -> tuple[np.ndarray, float]:
    """Class probabilities for every image of ``loader``, and the mean loss."""
    model.eval()
    outputs, total, count = [], 0.0, 0
    for images, labels in loader:
        with torch.autocast(loader.device.type, dtype=amp, enabled=amp is not None):
            logits = model(images)
        logits = logits.float()
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
        outputs.append(logits.softmax(dim=1).cpu())
    return torch.cat(outputs).numpy(), total / max(count, 1)


def scores(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    predicted = probabilities.argmax(axis=1)
    present = sorted(set(labels))
    aucs = [roc_auc_score(labels == c, probabilities[:, c]) for c in present if 0 < (labels == c).sum() < len(labels)]
    return {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else 0.5,
    }


def selection_score(val_scores: dict, select: str) -> float:
    """The validation figure that picks the best epoch, larger is better."""
    return -val_scores["loss"] if select == "log_loss" else val_scores[select]


# --- the loop --------------------------------------------------------------------

def _set_frozen(model: models.Classifier, frozen: bool) -> None:
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(not frozen)


def sampling_weights(labels: np.ndarray, sampler: str) -> np.ndarray | None:
    """Per-image draw weights: each class drawn equally often (``balanced``) or in
    proportion to the square root of its count (``sqrt``); None for plain shuffling."""
    if sampler == "shuffle":
        return None
    per_class = np.bincount(labels).astype(float)
    return (1.0 / per_class if sampler == "balanced" else per_class ** -0.5)[labels]


def sampled_prior(labels: np.ndarray, weights: np.ndarray | None, num_classes: int) -> np.ndarray:
    """The class shares the sampler draws (what a logit-adjusted loss corrects for)."""
    drawn = np.bincount(labels, weights=weights, minlength=num_classes).astype(float)
    return drawn / drawn.sum()


class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cpu":  # share the cores instead of oversubscribing them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all the same shape), in rank order."""
        if self.world == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return parts

    def gather_rows(self, loader: ArrayLoader, rows: torch.Tensor) -> torch.Tensor:
        """Put the per-rank outputs of an unshuffled sharded ``loader`` back in data order."""
        if self.world == 1:
            return rows
        full = torch.empty((len(loader.images), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        for rank, part in enumerate(self.gather(rows)):
            full[shard(torch.arange(len(loader.images)), rank, self.world).to(rows.device)] = part
        return full

    def in_sync(self, model: torch.nn.Module, device) -> bool:
        """Whether every rank holds the same weights (DDP's promise, checked)."""
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1).to(device)
        values = torch.cat(self.gather(checksum))
        return bool((values == values[0]).all())


def fingerprint(config: dict, data: TrainData) -> str:
    text = json.dumps(config, sort_keys=True) + data.fingerprint
    return hashlib.sha256(text.encode()).hexdigest()


def fit(config: dict, data: TrainData, *, model_path: Path, live_dir: Path, checkpoint_dir: Path,
        stop_after: int | None = None) -> dict:
    """Train ``config["model"]`` with ``config["models"][model]`` and ``config["train"]``.

    Writes the best model to ``model_path``, DVCLive logs to ``live_dir``, and the
    per-epoch checkpoint to ``checkpoint_dir/last.pt``. Returns the summary.
    """
    from dvclive import Live

    name = config["model"]
    train = check_config(dict(config["train"]))
    settings = (config.get("models") or {}).get(name) or {}
    ranks = Ranks()
    device = pick_device(train["device"])
    if device.type == "cuda" and ranks.world > 1:
        if ranks.local >= torch.cuda.device_count():
            raise PipelineError(f"train.nproc is {ranks.world} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    ranks.start(device)
    if not ranks.main:
        log.setLevel(logging.WARNING)
    seed_everything(train["seed"], train["deterministic"], device)
    model = models.build(name, num_classes=len(CLASSES), image_size=data.image_size, settings=settings,
                         head=train["head"], pretrained=train["pretrained"], weights_path=train["weights_path"])
    amp = amp_dtype(train["precision"], device)
    model = models.channels_last(model.to(device))
    if train["freeze"] and name in ("simple_cnn", "fixcaps"):
        raise PipelineError(f"train.freeze needs a pretrained backbone; {name} has none")
    # DDP wraps the model for training steps; saving and evaluation use the plain module.
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=train["freeze"])

    weights = sampling_weights(data.train_labels, train["sampler"])
    common = {"mean": models.IMAGENET_MEAN, "std": models.IMAGENET_STD, "device": device,
              "rank": ranks.rank, "world": ranks.world}
    train_loader = ArrayLoader(data.train_images, data.train_labels, batch_size=train["batch_size"],
                               shuffle=True, augment=train["augment"], seed=train["seed"], weights=weights, **common)
    val_loader = ArrayLoader(data.val_images, data.val_labels, batch_size=2 * train["batch_size"], **common)
    criterion = losses.build(train["loss"], weighted=train["class_weights"], label_smoothing=train["label_smoothing"],
                             gamma=train["focal_gamma"], labels=data.train_labels, num_classes=len(CLASSES),
                             logit_adjust=train["logit_adjust"],
                             prior=sampled_prior(data.train_labels, weights, len(CLASSES))).to(device)
    optimizer = make_optimizer(train["optimizer"], model.parameters(), train["lr"], train["weight_decay"],
                               train["momentum"])
    schedule = Schedule(optimizer, train["scheduler"], train["lr"], train["epochs"], len(train_loader),
                        train["warmup_epochs"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # The weights' moving average is what gets validated and saved (train.ema > 0).
    ema = None
    if train["ema"]:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(train["ema"]), use_buffers=True)
    evaluated = model if ema is None else ema.module

    run_id = fingerprint({"model": name, "settings": settings, "train": train}, data)
    checkpoint = Path(checkpoint_dir) / "last.pt"
    state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "stale": 0, "seconds": 0.0, "images": 0,
             "wall_seconds": 0.0}
    resumed = False
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved.get("run") == run_id and not saved.get("finished"):
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            if ema is not None:
                ema.load_state_dict(saved["ema"])
            scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["torch_rng"])
            state = {**state, **saved["state"]}
            resumed = True
            log.info("resuming from the checkpoint after epoch %d of %d", state["epoch"], train["epochs"])
    best_copy = Path(checkpoint_dir) / "best.pt"
    if not resumed and ranks.main:
        checkpoint.unlink(missing_ok=True)
        best_copy.unlink(missing_ok=True)
    elif resumed and ranks.main and state["best_epoch"] and not model_path.exists():
        # DVC deletes a stage's outputs before rerunning it; the best model so far lives on here.
        if not best_copy.exists():
            raise PipelineError(f"{model_path} and {best_copy} are gone; delete {checkpoint} to start over")
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(model_path) as tmp:
            shutil.copyfile(best_copy, tmp)

    parameters = models.parameter_count(model)
    log.info("%s: %s parameters on %s; %d train / %d validation images at %d px", name, f"{parameters:,}",
             device, len(data.train_labels), len(data.val_labels), data.image_size)
    live = Live(dir=str(live_dir), resume=resumed, dvcyaml=False, save_dvc_exp=False, report=None) if ranks.main else None
    try:
        for epoch in range(state["epoch"] + 1, train["epochs"] + 1):
            frozen = train["freeze"] and not (0 < train["unfreeze_after_epochs"] < epoch)
            _set_frozen(model, frozen)
            model.train()
            if frozen:
                model.backbone.eval()  # a frozen feature extractor keeps its BatchNorm statistics
            train_loader.set_epoch(epoch)
            started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            predictions, targets = [], []
            progress = bar(train_loader, desc=f"epoch {epoch}/{train['epochs']}", unit="batch", leave=False,
                           disable=None if ranks.main else True)
            for images, labels in progress:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = net(images)
                    loss = criterion(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.batch_end()
                if ema is not None:
                    ema.update_parameters(model)
                seen += len(labels)
                loss_sum += loss.item() * len(labels)
                predicted = logits.detach().argmax(dim=1)
                correct += (predicted == labels).sum().item()
                predictions.append(predicted.cpu())
                targets.append(labels.cpu())
                progress.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{schedule.current():.1e}")
            elapsed = time.perf_counter() - started
            loss_sum, seen, correct = ranks.sum([loss_sum, seen, correct], device)
            state["seconds"] += elapsed
            state["images"] += int(seen)
            predictions = torch.cat(ranks.gather(torch.cat(predictions).to(device))).cpu()
            targets = torch.cat(ranks.gather(torch.cat(targets).to(device))).cpu()
            train_scores = {"loss": loss_sum / seen, "accuracy": correct / seen,
                            "balanced_accuracy": float(balanced_accuracy_score(targets, predictions))}
            probabilities, val_loss = predict(evaluated, val_loader, amp)
            probabilities = ranks.gather_rows(val_loader, torch.from_numpy(probabilities).to(device)).cpu().numpy()
            (val_loss_sum,) = ranks.sum([val_loss * len(val_loader.order())], device)
            val_loss = val_loss_sum / (-(-len(data.val_labels) // ranks.world) * ranks.world)
            val_scores = {"loss": val_loss, **scores(data.val_labels, probabilities)}
            score = selection_score(val_scores, train["select"])
            schedule.epoch_end(score)

            state["wall_seconds"] += time.perf_counter() - started
            if live is not None:
                live.step = epoch
                for key, value in train_scores.items():
                    live.log_metric(f"train/{key}", value)
                for key, value in val_scores.items():
                    live.log_metric(f"val/{key}", value)
                live.log_metric("lr", schedule.current())
            improved = state["best_epoch"] == 0 or score > state["best_score"]
            # Every rank keeps the same early-stopping state (the scores are already
            # reduced), so all of them leave the loop at the same epoch.
            if improved:
                state.update(best_score=score, best_epoch=epoch, stale=0,
                             best={f"val_{k}": v for k, v in val_scores.items()})
                if ranks.main:
                    modelfile.save(model_path, evaluated, architecture=name, settings=settings, head=train["head"],
                                   classes=CLASSES, image_size=data.image_size, mean=models.IMAGENET_MEAN,
                                   std=models.IMAGENET_STD, training={"epoch": epoch, **state["best"]})
                    with atomic_path(best_copy) as tmp:
                        shutil.copyfile(model_path, tmp)
            else:
                state["stale"] += 1
            state["epoch"] = epoch
            log.info("epoch %d/%d  train loss %.3f bal.acc %.3f | val loss %.3f bal.acc %.3f acc %.3f auc %.3f%s  "
                     "(%.0f img/s)", epoch, train["epochs"], train_scores["loss"], train_scores["balanced_accuracy"],
                     val_loss, val_scores["balanced_accuracy"], val_scores["accuracy"], val_scores["macro_auc"],
                     "  *best" if improved else "", seen / elapsed)
            patience = train["early_stopping_patience"]
            stop = patience > 0 and state["stale"] >= patience
            if ranks.main:
                _save_checkpoint(checkpoint, run_id, model, optimizer, schedule, scaler, state, ema,
                                 finished=stop or epoch == train["epochs"])
                live.make_summary()
            if stop:
                log.info("early stop: no better validation %s for %d epochs", train["select"], patience)
                break
            if stop_after is not None and epoch >= stop_after:
                raise Interrupted(f"stopped after epoch {epoch}")

        summary = {
            "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], **state["best"],
            "parameters": parameters, "image_size": data.image_size, "processes": ranks.world,
            "precision": str(amp).replace("torch.", "") if amp is not None else "float32",
            "train_images_per_second": round(state["images"] / max(state["seconds"], 1e-9), 1),
            "train_seconds": round(state["wall_seconds"], 1),  # every epoch, validation included
        }
        if ranks.world > 1:
            if not ranks.in_sync(model, device):
                raise RuntimeError("model weights differ between ranks after training")
            log.info("weights identical on all %d ranks", ranks.world)
        if live is not None:
            for key, value in summary.items():
                live.summary[key] = value
            live.make_summary()
        return summary
    finally:
        if live is not None:
            live.end()
        ranks.stop()


def _save_checkpoint(path: Path, run_id, model, optimizer, schedule, scaler, state, ema, finished: bool) -> None:
    payload = {"run": run_id, "finished": finished, "model": model.state_dict(),
               **({} if ema is None else {"ema": ema.state_dict()}),
               "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
               "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "state": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
