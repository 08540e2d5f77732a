"""The train stage: fit the chosen model, select the epoch on validation, never on test.

``fit`` reads top to bottom as its steps: ``set_up`` (model, loaders, loss, optimiser,
schedule), ``resume`` (from the per-epoch checkpoint, so an interrupted run carries on
with the same batches and random state instead of starting over), then per epoch
``train_epoch`` and ``validate``, and ``end_epoch`` (log, step the schedule, keep the best, decide early stopping).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from skinlesion import CLASSES, PipelineError, modelfile
from skinlesion.data import patient
from skinlesion.data.prepare import Prepared
from skinlesion.evaluation.metrics import headline
from skinlesion.files import atomic_dir, atomic_path
from skinlesion.params import REGISTRY, Group, Train
from skinlesion.progress import bar
from skinlesion.training import losses, mixing, models
from skinlesion.training.devices import amp_dtype, pick_device, seed_everything
from skinlesion.training.loader import ArrayLoader
from skinlesion.training.ranks import Ranks
from skinlesion.training.schedule import Schedule, make_optimizer
from skinlesion.untrusted import first_line, shown

log = logging.getLogger(__name__)

NO_HEAD = {"hidden": 0, "dropout": 0.0}  # for architectures without a head setting (FixCaps)


# --- what one member trains with -------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One member's recipe: the architecture (``model``), its ``models.<model>``
    settings, the ``train`` group, and the member's seed (one of ``ensemble.seeds``)."""

    model: str
    settings: Group
    train: Train
    seed: int


# --- data ------------------------------------------------------------------------

@dataclass
class TrainData:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    data_digest: str  # of the images, labels and metadata rows: a checkpoint resumes on the same data only
    train_patient: np.ndarray | None = None  # encoded metadata rows (train.metadata), else None
    val_patient: np.ndarray | None = None

    @property
    def image_size(self) -> int:
        return self.train_images.shape[1]


def load_data(balanced: Path, split: Path, prepared: Path, metadata: bool = False) -> TrainData:
    """The balanced train set and the untouched validation split, decoded, in memory;
    with ``metadata``, each image's patient metadata encoded (from the split's CSVs)."""
    metadata_csv = split / "train.csv" if metadata else None
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
    data = TrainData(train_images, manifest["label"].to_numpy(), val_images, val["label"].to_numpy(),
                     digest.hexdigest())
    if metadata_csv is not None:
        data.train_patient = patient_rows(manifest, metadata_csv)
        data.val_patient = patient.encode(val, patient.encoding())
        digest.update(data.train_patient.tobytes())
        digest.update(data.val_patient.tobytes())
        data.data_digest = digest.hexdigest()
    return data


def patient_rows(frame: pd.DataFrame, metadata_csv: Path) -> np.ndarray:
    """The encoded metadata of ``frame``'s images, looked up by image_id in
    ``metadata_csv`` (an augmented copy in the balanced set keeps its source's id)."""
    table = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False).drop_duplicates("image_id")
    table = table.set_index("image_id")
    ids = frame["image_id"]
    missing = sorted(set(ids) - set(table.index))
    if missing:
        raise PipelineError(f"{metadata_csv}: no row for {len(missing)} image(s), e.g. {missing[0]}; "
                            f"rerun `dvc repro balance`")
    return patient.encode(table.loc[ids.to_numpy()].reset_index(drop=True), patient.encoding())


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


def run_digest(config: dict, data: TrainData) -> str:
    """What identifies a run for its checkpoint: the recipe and the data it trains on."""
    text = json.dumps(config, sort_keys=True) + data.data_digest
    return hashlib.sha256(text.encode()).hexdigest()


# --- set-up ------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one training run works with."""

    name: str
    train: Train
    seed: int
    settings: dict  # the architecture's settings without its head, as the model file records them
    head: dict
    data: TrainData
    ranks: Ranks
    device: torch.device
    amp: torch.dtype | None
    model: models.Classifier
    net: torch.nn.Module  # what takes the training steps: the model, or its DDP wrapper
    ema: torch.optim.swa_utils.AveragedModel | None
    train_loader: ArrayLoader
    val_loader: ArrayLoader
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    state: dict = field(default_factory=lambda: {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "stale": 0,
                                                 "seconds": 0.0, "images": 0, "wall_seconds": 0.0})

    @property
    def evaluated(self) -> torch.nn.Module:
        """What is validated and saved: the weights' moving average when there is one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def run_id(self) -> str:
        return run_digest({"model": self.name, "settings": self.settings, "head": self.head,
                            "train": {**self.train.model_dump(), "seed": self.seed}}, self.data)


def _device(train: Train, ranks: Ranks) -> torch.device:
    device = pick_device(train.device)
    if device.type == "cuda" and ranks.world > 1:
        if ranks.local >= torch.cuda.device_count():
            raise PipelineError(f"train.nproc is {ranks.world} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    return device


def set_up(config: Config, data: TrainData, ranks: Ranks) -> Run:
    """The model, loaders, loss, optimiser, schedule and weight average for ``config``."""
    name, train, seed = config.model, config.train, config.seed
    settings = config.settings.model_dump()
    head = settings.pop("head", NO_HEAD)
    device = _device(train, ranks)
    ranks.start(device)
    if not ranks.main:
        log.setLevel(logging.WARNING)
    seed_everything(seed, train.deterministic, device)
    if train.metadata != (data.train_patient is not None):
        raise PipelineError("train.metadata and the data loaded disagree; load the metadata with the train split")
    model = models.build(name, num_classes=len(CLASSES), image_size=data.image_size, settings=settings,
                         head=head, pretrained=train.pretrained, weights_path=train.weights_path,
                         patient_width=patient.width(patient.encoding()) if train.metadata else 0)
    amp = amp_dtype(train.precision, device)
    model = models.channels_last(model.to(device))
    if train.freeze and not REGISTRY[name].pretrained:
        raise PipelineError(f"train.freeze needs a pretrained backbone; {name} has none")
    net = model
    if ranks.world > 1:  # DDP wraps the model for training steps; saving and evaluation use the plain module
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=train.freeze)
    weights = sampling_weights(data.train_labels, train.sampler)
    common = {"mean": models.IMAGENET_MEAN, "std": models.IMAGENET_STD, "device": device,
              "rank": ranks.rank, "world": ranks.world}
    train_loader = ArrayLoader(data.train_images, data.train_labels, batch_size=train.batch_size,
                               shuffle=True, augment=train.augment, seed=seed, weights=weights,
                               patient=data.train_patient, **common)
    val_loader = ArrayLoader(data.val_images, data.val_labels, batch_size=2 * train.batch_size,
                             patient=data.val_patient, **common)
    criterion = losses.build(train.loss, weighted=train.class_weights, label_smoothing=train.label_smoothing,
                             gamma=train.focal_gamma, labels=data.train_labels, num_classes=len(CLASSES),
                             logit_adjust=train.logit_adjust,
                             prior=sampled_prior(data.train_labels, weights, len(CLASSES))).to(device)
    optimizer = make_optimizer(train.optimizer, model.parameters(), train.lr, train.weight_decay,
                               train.momentum)
    schedule = Schedule(optimizer, train.scheduler, train.lr, train.epochs, len(train_loader),
                        train.warmup_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = None
    if train.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(train.ema), use_buffers=True)
    return Run(name, train, seed, settings, head, data, ranks, device, amp, model, net, ema, train_loader, val_loader,
               criterion, optimizer, schedule, scaler)


# --- resume ------------------------------------------------------------------------

def resume(run: Run, checkpoint: Path, best_copy: Path, model_path: Path) -> bool | None:
    """Carry on from ``checkpoint`` if it belongs to this very run and is unfinished;
    otherwise clear it. A damaged checkpoint is set aside (``last.pt.damaged``) with a
    warning. Returns whether the run resumed; None when a damaged checkpoint had been
    partly loaded, so that ``run`` must be set up again."""
    resumed = False
    saved = _read_checkpoint(checkpoint) if checkpoint.exists() else None
    if saved is not None and saved.get("run") == run.run_id and not saved.get("finished"):
        try:
            run.model.load_state_dict(saved["model"])
            run.optimizer.load_state_dict(saved["optimizer"])
            run.schedule.load_state_dict(saved["schedule"])
            if run.ema is not None:
                run.ema.load_state_dict(saved["ema"])
            run.scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["torch_rng"])
            run.state.update(saved["state"])
            _restore_live(Path(checkpoint).parent / "live", saved.get("live"))
            resumed = True
        except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways; training starts over
            _set_aside(checkpoint, error)
            return None  # part of it went into ``run``: the caller sets up afresh
        if resumed:
            log.info("resuming from the checkpoint after epoch %d of %d", run.state["epoch"], run.train.epochs)
    if not resumed and run.ranks.main:
        checkpoint.unlink(missing_ok=True)
        best_copy.unlink(missing_ok=True)
    elif resumed and run.ranks.main and run.state["best_epoch"] and not model_path.exists():
        # DVC deletes a stage's outputs before rerunning it; the best model so far lives on here.
        if not best_copy.exists():
            raise PipelineError(f"{model_path} and {best_copy} are gone; delete {checkpoint} to start over")
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(model_path) as tmp:
            shutil.copyfile(best_copy, tmp)
    return resumed


def _restore_live(live_state: Path, files: dict[str, bytes] | None) -> None:
    """DVCLive's folder put back as the checkpoint recorded it (what it held at that epoch)."""
    if not files:
        return
    with atomic_dir(live_state) as out:
        for name, content in files.items():
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint's contents, or None (and the file set aside) when it cannot be read."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict):
            raise ValueError("not a checkpoint of this project")
        return saved
    except Exception as error:  # noqa: BLE001 - truncated, overwritten, foreign: all mean "start over"
        _set_aside(path, error)
        return None


def _set_aside(path: Path, error: BaseException) -> None:
    kept = path.with_name(path.name + ".damaged")
    path.replace(kept)
    reason = first_line(error)
    log.warning("warning: the checkpoint %s is damaged (%s); set aside as %s, training starts over",
                path, shown(reason, 120), kept)


def save_checkpoint(run: Run, path: Path, finished: bool, live_state: Path | None = None) -> None:
    """The run so far, in one file written in one step; with ``live_state``, DVCLive's
    folder as it stands goes in too, so that a resumed run's curves match its epoch even
    when the kill came while DVCLive was writing."""
    live = {} if live_state is None else {str(file.relative_to(live_state)): file.read_bytes()
                                           for file in sorted(Path(live_state).rglob("*")) if file.is_file()}
    payload = {"run": run.run_id, "finished": finished, "model": run.model.state_dict(), "live": live,
               **({} if run.ema is None else {"ema": run.ema.state_dict()}),
               "optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
               "scaler": run.scaler.state_dict(), "torch_rng": torch.get_rng_state(), "state": run.state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# --- one epoch ---------------------------------------------------------------------

def _set_frozen(run: Run, epoch: int) -> None:
    train = run.train
    frozen = train.freeze and not (0 < train.unfreeze_after_epochs < epoch)
    for parameter in run.model.backbone.parameters():
        parameter.requires_grad_(not frozen)
    run.model.train()
    if frozen:
        run.model.backbone.eval()  # a frozen feature extractor keeps its BatchNorm statistics


def train_epoch(run: Run, epoch: int) -> dict:
    """One pass over the train split; returns its loss, accuracy and balanced accuracy."""
    _set_frozen(run, epoch)
    run.train_loader.set_epoch(epoch)
    started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    predictions, targets = [], []
    progress = bar(run.train_loader, desc=f"epoch {epoch}/{run.train.epochs}", unit="batch", leave=False,
                   disable=None if run.ranks.main else True)
    mixer = mixing.Mixer(run.train.mixup, run.train.cutmix, run.seed, epoch)
    for batch, (images, labels, *patient_rows) in enumerate(progress, 1):
        mixed = mixer(images, labels, patient_rows) if mixer.active else None
        if mixed is not None:
            images, patient_rows = mixed.images, mixed.patient
        with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
            logits = run.net(images, *patient_rows)
            loss = (run.criterion(logits.float(), labels) if mixed is None
                    else mixing.mixed_loss(run.criterion, logits.float(), labels, mixed))
        value = loss.item()
        if not math.isfinite(value):
            raise PipelineError(f"the training loss is {value} at epoch {epoch}, batch {batch} (train.lr is "
                                f"{run.train.lr:g}): training diverged; lower train.lr (e.g. to "
                                f"{run.train.lr / 10:g}) and run again")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.schedule.batch_end()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        seen += len(labels)
        loss_sum += value * len(labels)
        predicted = logits.detach().argmax(dim=1)
        correct += (predicted == labels).sum().item()
        predictions.append(predicted.cpu())
        targets.append(labels.cpu())
        progress.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{run.schedule.current():.1e}")
    elapsed = time.perf_counter() - started
    ranks, device = run.ranks, run.device
    loss_sum, seen, correct = ranks.sum([loss_sum, seen, correct], device)
    run.state["seconds"] += elapsed
    run.state["images"] += int(seen)
    predictions = torch.cat(ranks.gather(torch.cat(predictions).to(device))).cpu()
    targets = torch.cat(ranks.gather(torch.cat(targets).to(device))).cpu()
    return {"loss": loss_sum / seen, "accuracy": correct / seen,
            "balanced_accuracy": float(balanced_accuracy_score(targets, predictions)),
            "images_per_second": seen / elapsed}


@torch.no_grad()
def probabilities(model, loader: ArrayLoader, amp) -> tuple[np.ndarray, float]:
    """Class probabilities for every image of ``loader``, and the mean loss."""
    model.eval()
    outputs, total, count = [], 0.0, 0
    for images, labels, *patient_rows in loader:
        with torch.autocast(loader.device.type, dtype=amp, enabled=amp is not None):
            logits = model(images, *patient_rows)
        logits = logits.float()
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
        outputs.append(logits.softmax(dim=1).cpu())
    return torch.cat(outputs).numpy(), total / max(count, 1)


def validate(run: Run) -> dict:
    """Loss, accuracy, balanced accuracy, macro-F1 and macro AUC on the validation split
    (every rank's share gathered back in order)."""
    ranks, device, loader = run.ranks, run.device, run.val_loader
    probs, loss = probabilities(run.evaluated, loader, run.amp)
    probs = ranks.gather_rows(loader, torch.from_numpy(probs).to(device)).cpu().numpy()
    (loss_sum,) = ranks.sum([loss * len(loader.order())], device)
    loss = loss_sum / (-(-len(run.data.val_labels) // ranks.world) * ranks.world)
    return {"loss": loss, **headline(run.data.val_labels, probs)}


def selection_score(val_scores: dict, select: str) -> float:
    """The validation figure that picks the best epoch, larger is better."""
    return -val_scores["loss"] if select == "log_loss" else val_scores[select]


# --- select, save, log ---------------------------------------------------------------

def end_epoch(run: Run, epoch: int, train_scores: dict, val_scores: dict, model_path: Path, best_copy: Path,
              live) -> bool:
    """Log the epoch, save the model if it is the best so far by ``train.select``, and
    decide early stopping. Every rank keeps the same state (the scores are already
    reduced), so all of them leave the loop at the same epoch. Returns whether to stop."""
    state, train = run.state, run.train
    score = selection_score(val_scores, train.select)
    run.schedule.epoch_end(score)
    if live is not None:
        live.step = epoch
        for key in ("loss", "accuracy", "balanced_accuracy"):
            live.log_metric(f"train/{key}", train_scores[key])
        for key, value in val_scores.items():
            live.log_metric(f"val/{key}", value)
        live.log_metric("lr", run.schedule.current())
    improved = state["best_epoch"] == 0 or score > state["best_score"]
    if improved:
        state.update(best_score=score, best_epoch=epoch, stale=0, best={f"val_{k}": v for k, v in val_scores.items()})
        if run.ranks.main:
            modelfile.save(model_path, run.evaluated, architecture=run.name, settings=run.settings,
                           head=run.head, classes=CLASSES, image_size=run.data.image_size,
                           mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                           training={"epoch": epoch, **state["best"]},
                           patient=patient.encoding() if train.metadata else None)
            with atomic_path(best_copy) as tmp:
                shutil.copyfile(model_path, tmp)
    else:
        state["stale"] += 1
    state["epoch"] = epoch
    log.info("epoch %d/%d  train loss %.3f bal.acc %.3f | val loss %.3f bal.acc %.3f acc %.3f auc %.3f%s  (%.0f img/s)",
             epoch, train.epochs, train_scores["loss"], train_scores["balanced_accuracy"], val_scores["loss"],
             val_scores["balanced_accuracy"], val_scores["accuracy"], val_scores["macro_auc"],
             "  *best" if improved else "", train_scores["images_per_second"])
    patience = train.early_stopping_patience
    stop = patience > 0 and state["stale"] >= patience
    if stop:
        log.info("early stop: no better validation %s for %d epochs", train.select, patience)
    return stop


def summary(run: Run) -> dict:
    state = run.state
    return {
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], **state["best"],
        "parameters": models.parameter_count(run.model), "image_size": run.data.image_size,
        "processes": run.ranks.world,
        "precision": str(run.amp).replace("torch.", "") if run.amp is not None else "float32",
        "train_images_per_second": round(state["images"] / max(state["seconds"], 1e-9), 1),
        "train_seconds": round(state["wall_seconds"], 1),  # every epoch, validation included
    }


# --- the loop ------------------------------------------------------------------------

def publish(live_state: Path, live_dir: str | Path) -> None:
    """``live_dir`` replaced, in one step, by a copy of DVCLive's folder."""
    live_dir = Path(live_dir)
    live_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(live_dir) as out:
        shutil.copytree(live_state, out, dirs_exist_ok=True)


def fit(config: Config, data: TrainData, *, model_path: Path, live_dir: Path, checkpoint_dir: Path) -> dict:
    """Train ``config.model`` with its settings, ``config.train`` and ``config.seed``.

    Writes the best model to ``model_path``, DVCLive logs to ``live_dir``, and the
    per-epoch checkpoint to ``checkpoint_dir/last.pt``. Returns the summary.

    DVCLive itself writes into ``checkpoint_dir/live``, which lives on beside the
    checkpoint, and ``live_dir`` is a copy of it made after every epoch. So
    ``live_dir`` can be an ordinary DVC output (deleted by DVC before the stage reruns,
    restored from the run cache) while a resumed run still continues its curves.
    """
    from dvclive import Live

    ranks = Ranks()
    run = set_up(config, data, ranks)
    checkpoint, best_copy = Path(checkpoint_dir) / "last.pt", Path(checkpoint_dir) / "best.pt"
    resumed = resume(run, checkpoint, best_copy, model_path)
    if resumed is None:
        run = set_up(config, data, ranks)
        resumed = resume(run, checkpoint, best_copy, model_path)
    log.info("%s: %s parameters on %s; %d train / %d validation images at %d px", run.name,
             f"{models.parameter_count(run.model):,}", run.device, len(data.train_labels), len(data.val_labels),
             data.image_size)
    live_state = Path(checkpoint_dir) / "live"
    if ranks.main and not resumed:
        shutil.rmtree(live_state, ignore_errors=True)
    live = Live(dir=str(live_state), resume=resumed, dvcyaml=False, save_dvc_exp=False, report=None) \
        if ranks.main else None
    try:
        for epoch in range(run.state["epoch"] + 1, run.train.epochs + 1):
            started = time.perf_counter()
            train_scores = train_epoch(run, epoch)
            val_scores = validate(run)
            run.state["wall_seconds"] += time.perf_counter() - started
            stop = end_epoch(run, epoch, train_scores, val_scores, model_path, best_copy, live)
            if ranks.main:
                live.make_summary()
                save_checkpoint(run, checkpoint, finished=stop or epoch == run.train.epochs, live_state=live_state)
                publish(live_state, live_dir)
            if stop:
                break
        result = summary(run)
        if ranks.world > 1:
            if not ranks.in_sync(run.model, run.device):
                raise RuntimeError("model weights differ between ranks after training")
            log.info("weights identical on all %d ranks", ranks.world)
        if live is not None:
            for key, value in result.items():
                live.summary[key] = value
            live.make_summary()
            publish(live_state, live_dir)
        ranks.finish()
        return result
    finally:
        if live is not None:
            live.end()
        ranks.stop()
