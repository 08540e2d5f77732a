"""Where the time goes: throughput of the real code paths against the model alone,
and the pipeline's stages under DVC. Run by hand; prints JSON and a markdown table.

    python benchmarks/run.py                                  # synthetic data, quick
    python benchmarks/run.py --source ../shared/ham10000      # the real copy
    python benchmarks/run.py --models resnet50 --size 224 --batch 128 --skip-pipeline   # on a GPU

Figures:
- train: images/s of the real training step (ArrayLoader with flips + forward,
  backward, optimiser step) against the same step on random tensors already on the
  device; the ratio shows whether data loading starves the model.
- loader: images/s of ArrayLoader alone, and of decoding + resizing JPEGs from
  data/raw (what every epoch would cost without the prepare stage).
- inference: images/s of the prediction path (skinlesion.evaluation.predictor on
  uint8 images) against the model's forward pass alone.
- onnx: images/s of the ONNX export on ONNX Runtime against the same graph in
  PyTorch (uint8 batch in, logits out, normalisation included), both on the CPU
  with the same number of threads, whatever --device says; for each ensemble size
  of --members (the cost of an ensemble at prediction).
- pipeline: wall time and peak memory of each stage in a full `dvc repro` of a
  fresh copy of this repository, a no-op `dvc repro`, and which stage one param of
  each stage invalidates (`dvc repro --dry`; it cannot know whether outputs will
  change, so it lists no dependants: tests/test_pipeline.py runs the changes for
  real and asserts the exact stages that rerun downstream).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skinlesion import CLASSES, synthetic  # noqa: E402
from skinlesion.data.prepare import load_image  # noqa: E402
from skinlesion.deployment import export, runtime  # noqa: E402
from skinlesion.evaluation import inference  # noqa: E402
from skinlesion.params import set_values as set_params  # noqa: E402
from skinlesion.training import models  # noqa: E402
from skinlesion.training.devices import amp_dtype  # noqa: E402
from skinlesion.training.loader import ArrayLoader  # noqa: E402

HEAD = {"hidden": 256, "dropout": 0.3}
RECIPE = yaml.safe_load((ROOT / "params.yaml").read_text())
PARAM_CHANGES = {  # one param per stage, and the stages that should rerun
    "download": ("download.max_unpacked_gb", 63),
    "prepare": ("prepare.image_size", None),  # set to size - 16 at run time
    "split": ("split.seed", 7),
    "balance": ("balance.seed", 7),
    "train": ("train.lr", 0.0021),
    "ensemble": ("ensemble.seeds", [42, 1]),  # a second member: train@1 alone, then what reads the model
    "evaluate": ("evaluate.mel_specificity", 0.8),
    "scope": ("scope.per_kind", 10),
    "explain": ("explain.per_class", 2),
}


def timed(step, warmup: int, repeats: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats


def bench_model(name: str, size: int, batch: int, device: torch.device, steps: int, precision: str,
                augment: str, compile_step: bool = False) -> dict:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    model = models.build(name, num_classes=len(CLASSES), image_size=size, settings={}, head=HEAD).to(device)
    model = models.channels_last(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = amp_dtype(precision, device)  # what train.precision picks on this device
    amp = dtype is not None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fmt = torch.channels_last
    forward = torch.compile(model) if compile_step else model

    def step(images, labels):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = torch.nn.functional.cross_entropy(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    fixed = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    fixed_labels = torch.randint(0, len(CLASSES), (batch,), device=device)
    model.train()
    # The baselines are timed before and after the real path and the faster kept:
    # whatever is timed first pays for warm-up, which would flatter the real path.
    model_only = batch / timed(lambda: step(fixed, fixed_labels), 2, steps, sync)

    count = batch * (steps + 2)
    pixels = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, len(CLASSES), count)
    # The real path draws batches the way the recipe does: its own augmentation.
    loader = ArrayLoader(pixels, labels, batch_size=batch, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                         device=device, shuffle=True, augment=augment)
    batches = iter(loader)
    real = batch / timed(lambda: step(*next(batches)), 2, steps, sync)
    model_only = max(model_only, batch / timed(lambda: step(fixed, fixed_labels), 1, steps, sync))

    def load_only():
        for _ in ArrayLoader(pixels, labels, batch_size=batch, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                             device=device, shuffle=True, augment=augment):
            pass
    loader_rate = count / timed(load_only, 1, 3, sync)

    model.eval()
    info = {"architecture": name, "classes": list(CLASSES), "image_size": size, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD)}
    predictor = inference.TorchPredictor(model, info, device)
    # Scoring runs in float32 whatever train.precision says (so PyTorch and the ONNX export
    # give the same probabilities): the baseline is the float32 forward pass.
    def forward_only_rate():
        with torch.no_grad():
            return batch / timed(lambda: model(fixed), 2, steps, sync)
    forward_only = forward_only_rate()
    predict_rate = count / timed(
        lambda: predictor.probabilities(pixels, batch_size=batch), 1, 2, sync)
    forward_only = max(forward_only, forward_only_rate())
    return {"model": name, "image_size": size, "batch": batch, "device": str(device),
            "precision": str(dtype).replace("torch.", "") if amp else "float32", "augment": augment,
            "compiled": compile_step,
            "parameters": models.parameter_count(model),
            "train_images_per_s": round(real, 1), "train_model_only_images_per_s": round(model_only, 1),
            "train_ratio": round(real / model_only, 3),
            "loader_images_per_s": round(loader_rate, 1),
            "predict_images_per_s": round(predict_rate, 1), "forward_only_images_per_s": round(forward_only, 1),
            "predict_ratio": round(predict_rate / forward_only, 3)}


def bench_onnx(name: str, size: int, batch: int, steps: int, members: int = 1) -> dict:
    """ONNX Runtime against PyTorch on the CPU, one uint8 batch to logits; ``members``
    networks as one ensemble (their mean softmax, as calibrate combines them) costs
    what prediction with an ensemble model file costs."""
    torch.manual_seed(0)
    networks = [models.channels_last(models.build(name, num_classes=len(CLASSES), image_size=size, settings={},
                                                  head=HEAD)).eval() for _ in range(members)]
    model = networks[0] if members == 1 else models.Ensemble(networks, "probabilities").eval()
    info = {"architecture": name, "classes": list(CLASSES), "image_size": size, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD)}
    threads = torch.get_num_threads()
    session, _ = runtime.load(export.to_onnx(model, info), threads=threads)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    wrapper = export.Normalised(model, models.IMAGENET_MEAN, models.IMAGENET_STD).eval()
    tensor = torch.from_numpy(pixels)

    def pytorch_rate():
        with torch.no_grad():
            return batch / timed(lambda: wrapper(tensor), 2, steps, lambda: None)

    def onnx_rate():
        return batch / timed(lambda: session.run([runtime.OUTPUT], {runtime.INPUT: pixels}), 2, steps, lambda: None)

    # Each timed twice, alternating, the faster kept: neither pays for the other's warm-up.
    pytorch, onnx = pytorch_rate(), onnx_rate()
    pytorch, onnx = max(pytorch, pytorch_rate()), max(onnx, onnx_rate())
    return {"model": name, "members": members, "image_size": size, "batch": batch, "threads": threads,
            "pytorch_cpu_images_per_s": round(pytorch, 1), "onnx_cpu_images_per_s": round(onnx, 1),
            "onnx_ratio": round(onnx / pytorch, 3)}


def bench_decode(raw: Path, size: int, limit: int = 400) -> float:
    files = sorted((raw / "images").glob("*.jpg"))[:limit]
    start = time.perf_counter()
    for file in files:
        load_image(file, size)
    return round(len(files) / (time.perf_counter() - start), 1)


def run_timed(command: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) of the whole process tree, and output."""
    timer = shutil.which("time") or "/usr/bin/time"
    result = subprocess.run([timer, "-f", "@@%e %M", *command], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    wall, peak = re.findall(r"@@([\d.]+) (\d+)", result.stderr)[-1]
    return float(wall), int(peak), result.stdout


SCORING_STAGES = ("calibrate", "export", "evaluate", "external", "scope", "card", "explain")


def bench_pipeline(source: Path, workdir: Path, overrides: dict, scoring_precisions=()) -> dict:
    project = workdir / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    set_params(project, {"download.source": "local", "download.path": str(source.resolve()), **overrides})
    env_stage = {}
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    for stage in stages:  # each stage alone, in DAG order, so each gets its own wall time and peak memory
        wall, peak, _ = run_timed(["dvc", "repro", "--single-item", stage], project)
        env_stage[stage] = {"seconds": wall, "peak_rss_mib": round(peak / 1024)}
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "benchmark baseline"], cwd=project, check=True)
    noop, _, _ = run_timed(["dvc", "repro"], project)
    reruns = {}
    size = yaml.safe_load((project / "params.yaml").read_text())["prepare"]["image_size"]
    for _stage, (key, value) in PARAM_CHANGES.items():
        value = size - 16 if key == "prepare.image_size" else value
        set_params(project, {key: value})
        _, _, out = run_timed(["dvc", "repro", "--dry"], project)  # lists downstream stages too
        reruns[f"{key}={value}"] = re.findall(r"Running stage '([\w@]+)'", out)
        subprocess.run(["git", "checkout", "params.yaml"], cwd=project, check=True)
    scoring = {}
    for precision in scoring_precisions:  # the scoring stages again, scoring in another precision
        set_params(project, {"calibrate.precision": precision})
        scoring[precision] = {stage: run_timed(["dvc", "repro", "--single-item", stage], project)[0]
                              for stage in SCORING_STAGES if stage in stages}
        subprocess.run(["git", "checkout", "params.yaml"], cwd=project, check=True)
    return {"stages": env_stage, "noop_repro_seconds": noop, "reruns": reruns, "scoring_precision": scoring}


def markdown(result: dict) -> str:
    lines = ["| model | px | batch | device | precision | augment | train img/s | model-only img/s | ratio | loader img/s "
             "| predict img/s | forward-only fp32 img/s | ratio |", "|" + "---|" * 13]
    for row in result["models"]:
        lines.append(f"| {row['model']} | {row['image_size']} | {row['batch']} | {row['device']}"
                     f"{' compiled' if row['compiled'] else ''} | {row['precision']} | {row['augment']} | "
                     f"{row['train_images_per_s']} | "
                     f"{row['train_model_only_images_per_s']} | {row['train_ratio']} | {row['loader_images_per_s']} | "
                     f"{row['predict_images_per_s']} | {row['forward_only_images_per_s']} | {row['predict_ratio']} |")
    if result.get("onnx"):
        lines += ["", "| model | members | px | batch | CPU threads | PyTorch img/s | ONNX Runtime img/s | ratio |",
                  "|" + "---|" * 8]
        lines += [f"| {row['model']} | {row['members']} | {row['image_size']} | {row['batch']} | {row['threads']} | "
                  f"{row['pytorch_cpu_images_per_s']} | {row['onnx_cpu_images_per_s']} | {row['onnx_ratio']} |"
                  for row in result["onnx"]]
    if "decode_jpeg_images_per_s" in result:
        lines.append(f"\nDecoding + resizing JPEGs from data/raw: {result['decode_jpeg_images_per_s']} img/s "
                     f"(the prepared array is what the loader reads instead).")
    if "pipeline" in result:
        pipeline = result["pipeline"]
        lines += ["", "| stage | wall s | peak RSS MiB |", "|---|---|---|"]
        lines += [f"| {name} | {v['seconds']} | {v['peak_rss_mib']} |" for name, v in pipeline["stages"].items()]
        lines.append(f"\nNo-op `dvc repro`: {pipeline['noop_repro_seconds']} s")
        if pipeline.get("scoring_precision"):
            others = list(pipeline["scoring_precision"])
            lines += ["", "| scoring stage | `calibrate.precision` as run | " + " | ".join(others) + " |",
                      "|" + "---|" * (2 + len(others))]
            for stage in pipeline["scoring_precision"][others[0]]:
                lines.append(f"| {stage} | {pipeline['stages'][stage]['seconds']} | "
                             + " | ".join(str(pipeline["scoring_precision"][o][stage]) for o in others) + " |")
        lines += ["", "| param changed | stage whose own inputs changed (`dvc repro --dry`) |", "|---|---|"]
        lines += [f"| `{key}` | {', '.join(value)} |" for key, value in pipeline["reruns"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="a HAM10000 copy (default: a synthetic one)")
    parser.add_argument("--models", nargs="+", default=["simple_cnn", "resnet18"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "auto"],
                        help="train.precision values to time (auto: bf16 on a CPU with native bf16, mixed on CUDA)")
    parser.add_argument("--augment", default=RECIPE["train"]["augment"],
                        help="the augmentation of the real training path (default: the recipe's)")
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs in the pipeline run")
    parser.add_argument("--pipeline-model", default="simple_cnn", help="the model trained in the pipeline run")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--scoring-precision", nargs="*", default=["fp32"],
                        help="after the pipeline run, time its scoring stages again with calibrate.precision at each")
    parser.add_argument("--skip-onnx", action="store_true", help="no ONNX Runtime against PyTorch comparison")
    parser.add_argument("--members", nargs="+", type=int, default=[1],
                        help="ensemble sizes of the ONNX Runtime against PyTorch comparison (1: one model)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    os.environ["SKINLESION_PROGRESS"] = "0"
    device = torch.device(args.device)
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "device": torch.cuda.get_device_name() if device.type == "cuda"
                          else platform.processor() or platform.machine()}}
    result["models"] = [bench_model(name, args.size, args.batch, device, args.steps, precision, args.augment, compiled)
                        for name in args.models for precision in dict.fromkeys(args.precision)
                        for compiled in ([False, True] if args.compile else [False])]
    if not args.skip_onnx:
        result["onnx"] = [bench_onnx(name, args.size, args.batch, args.steps, members)
                          for name in args.models for members in args.members]
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            source = args.source
            if source is None:
                source = scratch / "synthetic"
                synthetic.make_dataset(source, layout="zips")
            result["pipeline"] = bench_pipeline(
                source, scratch, {"prepare.image_size": args.size, "train.epochs": args.epochs, "model": args.pipeline_model},
                args.scoring_precision)
            result["decode_jpeg_images_per_s"] = bench_decode(scratch / "project/data/raw", args.size)
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown(result))
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
