"""CPU speed of Spatial-Mamba-T against timm's Swin-T, ConvNeXt-T and MambaOut-T: PyTorch eager, torch.compile and
ONNX Runtime, measured in one process.

    python benchmarks/cpu_peers.py [--paths eager compiled onnx] [--rounds 3]
        [--cases train_b8_224 infer_b8_224 infer_b1_512 infer_b1_1024] [--models Spatial-Mamba-T Swin-T ...]
        [--smoke] [--out benchmarks/results/cpu_peers.json]

Cases: a training step (forward, backward and an SGD update) at batch 8, 224x224, and inference (``torch.no_grad``,
eval mode) at batch 8 224x224, batch 1 512x512 and batch 1 1024x1024, all on random data with randomly initialised
models. Each case runs every model along each path:

- ``eager``: the PyTorch module as built;
- ``compiled``: the module through ``torch.compile`` with the same options for every model (``COMPILE_OPTIONS``);
  the training step compiles the model and runs its forward, backward and SGD update as in eager;
- ``onnx`` (inference only): every model written the same way, by the dynamo exporter (opset ``OPSET``) at the
  case's fixed shape (Swin's window partition cannot take a dynamic image size), and run by an
  ``onnxruntime.InferenceSession`` on the CPUExecutionProvider with as many intra-op threads as torch uses. A model
  that exporter cannot take falls back to the TorchScript exporter; the report names the exporter each used.

All models and paths of a case are timed in the same interleaved rounds (one call of each per round, after one
untimed warm-up call each), so that a change of load on a shared machine hits every model alike. A path's ratio is a
model's median seconds over Swin-T's on the same path. Compilation (the first call's seconds less the median) and
export are reported apart from the timings. A model that fails to build, compile, export or run on a path gets
"n/a" there, and the error's first line goes into the report. Prints the table and whether Spatial-Mamba-T meets the
goals below, and writes the report as JSON. ``--smoke`` runs models one block deep per stage at batch 1, 64x64, one
round: it only checks that every path runs, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Tuple

import timm
import torch

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)
from spatial_mamba.ops.backends import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parents[1]

# Goals for Spatial-Mamba-T's ratio to Swin-T: inference on every path, the training step in eager mode.
INFERENCE_GOAL = 1.0
TRAINING_GOAL = 1.25

MODELS = {
    "Spatial-Mamba-T": "spatial_mamba_tiny",
    "Swin-T": "swin_tiny_patch4_window7_224",
    "ConvNeXt-T": "convnext_tiny",
    "MambaOut-T": "mambaout_tiny",
}
# Training cases also time Spatial-Mamba-T with its mixers keeping their intermediates (no recomputation in the
# backward pass): the price of the default's smaller memory, measured in the same rounds.
TRAIN_ONLY = {"Spatial-Mamba-T kept": ("spatial_mamba_tiny", {"recompute_mixer": False})}
OURS = "Spatial-Mamba-T"
REFERENCE = "Swin-T"
# name: (training?, batch, image size)
CASES = {
    "train_b8_224": (True, 8, 224),
    "infer_b8_224": (False, 8, 224),
    "infer_b1_512": (False, 1, 512),
    "infer_b1_1024": (False, 1, 1024),
}
# One block per stage: the same code paths as the full models, compiled and exported in a fraction of the time.
SMOKE = dict(batch=1, img_size=64, rounds=1, cases=("train_b8_224", "infer_b8_224"), depths=(1, 1, 1, 1))
PATHS = ("eager", "compiled", "onnx")
TITLES = {"eager": "eager", "compiled": "compiled", "onnx": "ONNX Runtime"}
# Default inductor, static shapes: each case compiles its own models for its one input shape.
COMPILE_OPTIONS = {"dynamic": False}
OPSET = 18
NA = "n/a"


def build(name: str, img_size: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    # Swin's window attention is built for one input size; the others take any size.
    if name.startswith("swin"):
        kwargs["img_size"] = img_size
    return timm.create_model(name, num_classes=1000, **kwargs)


def models_of(case: str, labels: List[str], smoke: bool = False) -> Dict[str, tuple]:
    """label -> (timm name, extra arguments) of the models among ``labels`` timed in ``case``."""
    known = {label: (name, {}) for label, name in MODELS.items()}
    if CASES[case][0]:
        known.update(TRAIN_ONLY)
    extra = {"depths": SMOKE["depths"]} if smoke else {}
    return {label: (known[label][0], {**known[label][1], **extra}) for label in labels if label in known}


def inputs(batch: int, img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images and labels, the same for every model and path."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, img_size, img_size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def step_fn(model: torch.nn.Module, train: bool, batch: int, img_size: int) -> Callable[[], None]:
    """One training step or one inference call of ``model`` (eager or compiled) on fixed random data."""
    x, y = inputs(batch, img_size)
    if not train:
        model.eval()

        def infer():
            with torch.no_grad():
                model(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def first_line(error: BaseException) -> str:
    """The root cause's type and first line: exporters wrap the error that says what failed in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def time_interleaved(steps: Dict[Hashable, Callable[[], None]], rounds: int) -> Dict[Hashable, dict]:
    """key -> {"first_call_s", "runs_s"} for each step, or {"error"} for one that raised.

    Every step is called once untimed (allocator, oneDNN primitive caches, the kernels' first compile, torch.compile's
    tracing), then once per round in the same order, so that a change of load hits all steps alike. A step that
    raises is dropped from the later rounds, its error's first line kept."""
    results: Dict[Hashable, dict] = {}
    for key, step in steps.items():
        start = time.perf_counter()
        try:
            step()
        except Exception as error:  # a peer that fails to compile or run is reported, the others go on
            results[key] = {"error": first_line(error)}
            continue
        results[key] = {"first_call_s": time.perf_counter() - start, "runs_s": []}
    for _ in range(rounds):
        for key, step in steps.items():
            if "error" in results[key]:
                continue
            start = time.perf_counter()
            try:
                step()
            except Exception as error:
                results[key] = {"error": first_line(error)}
                continue
            results[key]["runs_s"].append(time.perf_counter() - start)
    return results


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Tuple[str, List[str]]:
    """Writes ``model`` to ``path``; returns the exporter that worked and the first lines of those that failed before:
    the dynamo exporter at ``x``'s shape, else TorchScript's."""

    def fixed(dynamo: bool) -> Callable[[], None]:
        def write():
            program = torch.onnx.export(
                model, (x,), None if dynamo else str(path), dynamo=dynamo, opset_version=OPSET,
                input_names=["images"], output_names=["logits"], verbose=False,
            )  # fmt: skip
            if dynamo:
                program.save(str(path))

        return write

    exporters = {
        "dynamo, fixed shape": fixed(dynamo=True),
        "torchscript, fixed shape": fixed(dynamo=False),
    }
    failures = []
    for exporter, write in exporters.items():
        try:
            write()
            return exporter, failures
        except Exception as error:
            failures.append(f"{exporter}: {first_line(error)}")
    raise RuntimeError("; ".join(failures))


def onnx_step(model: torch.nn.Module, batch: int, img_size: int, folder: Path, label: str, info: dict):
    """An ONNX Runtime inference call of ``model``'s exported file; fills ``info`` with the export's facts."""
    import onnxruntime as ort

    model.eval()
    x, _ = inputs(batch, img_size)
    path = folder / f"{label.replace(' ', '_')}.onnx"
    start = time.perf_counter()
    info["exporter"], info["export_errors"] = export_onnx(model, x, path)
    info["export_s"] = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    info["session_init_s"] = time.perf_counter() - start
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def make_step(path: str, name: str, kwargs: dict, shape: tuple, folder: Path, label: str, info: dict):
    train, batch, img_size = shape
    model = build(name, img_size, **kwargs)
    if path == "eager":
        return step_fn(model, train, batch, img_size)
    if path == "compiled":
        return step_fn(torch.compile(model, **COMPILE_OPTIONS), train, batch, img_size)
    return onnx_step(model, batch, img_size, folder, label, info)


def run_case(
    case: str, shape: tuple, paths: List[str], labels: List[str], rounds: int, folder: Path, smoke: bool = False
) -> dict:
    """path -> label -> this model's figures on that path (or its error), all timed in the same rounds.

    ``shape`` is the case's (training?, batch, image size), smaller than ``CASES[case]`` under --smoke."""
    paths = [p for p in paths if not (shape[0] and p == "onnx")]
    steps, entries = {}, {p: {} for p in paths}
    for path in paths:
        for label, (name, kwargs) in models_of(case, labels, smoke).items():
            info = entries[path][label] = {}
            try:
                steps[path, label] = make_step(path, name, kwargs, shape, folder, label, info)
            except Exception as error:
                info["error"] = first_line(error)
    timed = time_interleaved(steps, rounds)
    # The compiled models and sessions (and their arenas) must go before the next case's are built.
    del steps
    gc.collect()
    for (path, label), result in timed.items():
        info = entries[path][label]
        if "error" in result:
            info["error"] = result["error"]
            continue
        info.update(median_s=statistics.median(result["runs_s"]), **result)
        if path == "compiled":
            info["compile_s"] = max(result["first_call_s"] - info["median_s"], 0.0)
    for models in entries.values():
        reference = models.get(REFERENCE, {}).get("median_s")
        for info in models.values():
            if "median_s" not in info:
                info.update(median_s=NA, ratio_to_swin_t=NA)
            elif reference is None:
                info.update(ratio_to_swin_t=NA, error=f"{REFERENCE} has no time on this path")
            else:
                info["ratio_to_swin_t"] = info["median_s"] / reference
    return entries


def goals(results: Dict[str, dict]) -> List[dict]:
    """Spatial-Mamba-T's ratio against each goal: inference on every path measured, training in eager."""
    checks = []
    for case, by_path in results.items():
        train = CASES[case][0]
        for path, models in by_path.items():
            if train and path != "eager" or OURS not in models:
                continue
            value = models[OURS]["ratio_to_swin_t"]
            goal = TRAINING_GOAL if train else INFERENCE_GOAL
            met = None if value == NA else value <= goal
            checks.append(dict(case=case, path=path, ratio=value, goal=goal, met=met))
    return checks


def cell(info: dict | None) -> str:
    if info is None:
        return f"{'-':>18}"
    if info["ratio_to_swin_t"] == NA:
        return f"{NA:>18}"
    return f"{info['ratio_to_swin_t']:>7.2f} ({info['median_s']:>7.3f}s)"


def print_table(case: str, by_path: Dict[str, dict], paths: List[str]) -> None:
    labels = list(dict.fromkeys(label for models in by_path.values() for label in models))
    for label in labels:
        cells = "".join(cell(by_path[p].get(label) if p in by_path else None) for p in paths)
        setup = [
            f"{word} {by_path[p][label][key]:.0f} s"
            for p, key, word in (("compiled", "compile_s", "compile"), ("onnx", "export_s", "export"))
            if p in by_path and key in by_path[p].get(label, {})
        ]
        print(f"{case:<16}{label:<22}{cells}  {', '.join(setup)}", flush=True)
    for path, models in by_path.items():
        for label, info in models.items():
            if "error" in info:
                print(f"    {path} {label}: {info['error']}")
            for failure in info.get("export_errors", []):
                print(f"    onnx {label} fell back from {failure}")


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case, median reported (3)")
    parser.add_argument("--cases", nargs="+", default=None, choices=list(CASES))
    parser.add_argument("--models", nargs="+", default=[*MODELS, *TRAIN_ONLY], choices=[*MODELS, *TRAIN_ONLY])
    parser.add_argument(
        "--smoke", action="store_true", help="shallow models, batch 1, 64x64, one round: a check that all paths run"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_peers.json"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (SMOKE["rounds"] if args.smoke else 3)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, got {rounds}")
    cases = args.cases or list(SMOKE["cases"] if args.smoke else CASES)
    paths = [p for p in PATHS if p in args.paths]
    # Every ratio is to Swin-T, so it runs whatever the selection.
    labels = list(dict.fromkeys([REFERENCE, *args.models]))
    shapes = {
        case: (CASES[case][0], SMOKE["batch"], SMOKE["img_size"]) if args.smoke else CASES[case] for case in cases
    }
    versions = {"torch": torch.__version__, "timm": timm.__version__}
    if "onnx" in paths:
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)

    results = {}

    def write_report() -> dict:
        # Written after every case, so that a run stopped midway (out of memory at 1024x1024, say) keeps the cases
        # it finished.
        report = {
            "benchmark": "cpu_peers",
            "command": [sys.executable, *sys.argv] if argv is None else ["cpu_peers.py", *argv],
            "git_commit": git_commit(),
            "smoke": args.smoke,
            "models": {
                label: MODELS[label] if label in MODELS else f"{TRAIN_ONLY[label][0]} {TRAIN_ONLY[label][1]}"
                for label in labels
            },
            "cases": {case: dict(zip(("train", "batch", "img_size"), shape)) for case, shape in shapes.items()},
            "paths": paths,
            "compile_options": COMPILE_OPTIONS,
            "onnx_opset": OPSET,
            "rounds": rounds,
            **versions,
            "threads": torch.get_num_threads(),
            "cpu": cpu_kernels.describe_cpu(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "goals": {"inference_every_path": INFERENCE_GOAL, "training_eager": TRAINING_GOAL},
            "goal_checks": goals(results),
            "results": results,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        partial.replace(out)  # a reader never sees half a report
        return report

    print(f"ratio to {REFERENCE} (median seconds) per path; compile and export seconds apart")
    print(f"{'case':<16}{'model':<22}" + "".join(f"{TITLES[p]:>18}" for p in paths) + "  setup")
    with tempfile.TemporaryDirectory(prefix="cpu_peers_") as folder:
        # A fresh inductor cache, so that the compile times do not depend on earlier runs.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")
        for case in cases:
            results[case] = run_case(case, shapes[case], paths, labels, rounds, Path(folder), args.smoke)
            print_table(case, results[case], paths)
            write_report()
    checks = goals(results)
    print(f"{OURS} against its goals (ratio to {REFERENCE}):")
    for check in checks:
        verdict = {True: "met", False: "not met", None: "not measured"}[check["met"]]
        value = check["ratio"] if check["ratio"] == NA else f"{check['ratio']:.2f}"
        print(f"  {check['case']} {check['path']}: {value} <= {check['goal']}: {verdict}")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
