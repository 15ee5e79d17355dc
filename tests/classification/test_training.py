"""End to end on the CPU: two-process DDP training (gloo) under torchrun, a kill and an auto-resume to the same state,
``--pretrained --eval`` reproducing the logged accuracy, and ``--throughput`` under the official launcher."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import MAIN, free_port, run_single, run_torchrun, spawn_workers, subprocess_env

pytestmark = pytest.mark.slow


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def output_of(result) -> str:
    errors = [line for line in result.stderr.splitlines() if "rror" in line or "[rank" in line]
    return f"--- stdout ---\n{result.stdout[-3000:]}\n--- errors in stderr ---\n" + "\n".join(errors[-40:])


@pytest.fixture(scope="module")
def straight(image_folder, tiny_cfg, tmp_path_factory):
    """Two epochs without interruption, two processes under torchrun."""
    out = tmp_path_factory.mktemp("runs")
    args = ["--cfg", tiny_cfg, "--data-path", image_folder, "--output", out]
    result = run_torchrun([*args, "--tag", "straight"])
    assert result.returncode == 0, output_of(result)
    return out / "tiny_test" / "straight", args


def test_two_process_run_writes_checkpoints_logs_scalars_and_plot(straight):
    run_dir, _ = straight
    for name in ("latest_ckpt.pth", "best_ckpt.pth", "best_ckpt_ema.pth", "config.json", "log_rank0.txt",
                 "log_rank1.txt", "training_curves.png"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    latest = load(run_dir / "latest_ckpt.pth")
    official_keys = {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "max_accuracy", "config"}
    assert official_keys <= set(latest) and latest["epoch"] == 1
    assert latest["max_accuray_ema"] == latest["max_accuracy_ema"]
    assert not any(k.startswith("module.") for k in latest["model"])
    saved = yaml.safe_load((run_dir / "config.json").read_text())
    assert saved["TRAIN"]["BASE_LR"] == pytest.approx(0.5 * 4 * 2 / 512)  # scaled by the total batch / 512
    rank0, rank1 = ((run_dir / f"log_rank{r}.txt").read_text() for r in (0, 1))
    assert len(re.findall(r"Accuracy of the network on the 16 test images: [\d.]+%", rank0)) == 2
    assert "rank 1 of 2" in rank1 and re.search(r"\] \(\S+ \d+\): INFO Train: \[1/2\]\[5/6\]\teta \S+ lr ", rank0)
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tiny_test\] ", rank0, re.M)  # the model name, as official logs
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "Accuracy/val", "Accuracy_ema/val", "throughput/train"} <= tags
    assert len(events.Scalars("train/lr")) == 12  # one per optimizer step: 2 epochs x 6 steps
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_run_resumes_to_the_same_state(straight, tmp_path):
    """SIGKILL both workers once epoch 0's checkpoint exists, then rerun the same command: auto-resume must finish
    with weights, EMA, optimizer and scheduler bit-identical to the uninterrupted run. Bit-exact because every random
    stream (sampler, augmentation, Mixup, drop-path) is reseeded from (seed, rank, epoch) at each epoch start and
    the CPU kernels are deterministic with one thread per process."""
    straight_dir, args = straight
    args = [*args, "--tag", "killed"]
    run_dir = straight_dir.parent / "killed"
    workers = spawn_workers(args, log_dir=tmp_path)
    deadline = time.time() + 240
    while not (run_dir / "latest_ckpt.pth").exists():
        assert time.time() < deadline and all(w.poll() is None for w in workers), (tmp_path / "worker0.txt").read_text()
        time.sleep(0.02)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.wait()
    assert load(run_dir / "latest_ckpt.pth")["epoch"] == 0

    result = run_torchrun(args)
    assert result.returncode == 0, output_of(result)
    assert "resumed at epoch 1" in (run_dir / "log_rank0.txt").read_text()

    expected, resumed = load(straight_dir / "latest_ckpt.pth"), load(run_dir / "latest_ckpt.pth")
    for key in ("model", "model_ema"):
        assert expected[key].keys() == resumed[key].keys()
        for name, tensor in expected[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name}"
    opt_a, opt_b = expected["optimizer"], resumed["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), (index, name)
    assert expected["lr_scheduler"] == resumed["lr_scheduler"]
    for key in ("epoch", "max_accuracy", "max_accuracy_ema", "max_accuray_ema"):
        assert expected[key] == resumed[key], key


def test_pretrained_eval_reproduces_the_logged_accuracy(straight, image_folder, tiny_cfg, tmp_path):
    run_dir, _ = straight
    best = load(run_dir / "best_ckpt.pth")
    records = {r["epoch"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    logged = records[best["epoch"]]
    args = ["--cfg", tiny_cfg, "--data-path", image_folder, "--output", tmp_path, "--tag", "eval"]
    result = run_single([*args, "--pretrained", run_dir / "best_ckpt.pth", "--eval"])  # one process, no launcher
    assert result.returncode == 0, output_of(result)

    official = [tuple(map(float, m)) for m in re.findall(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+)\n", result.stdout)]
    losses = [float(m) for m in re.findall(r"validation of the network(?: ema)?: loss ([\d.]+)", result.stdout)]
    assert official[0] == (round(logged["val_acc1"], 3), round(logged["val_acc5"], 3))  # the model, then its EMA
    assert losses[0] == round(logged["val_loss"], 4)
    assert official[1][0] == round(logged["val_acc1_ema"], 3)
    assert f"Accuracy of the network on the 16 test images: {logged['val_acc1']:.1f}%" in result.stdout
    assert not list((tmp_path / "tiny_test" / "eval").glob("*.pth"))

    # Without --eval the official script went on to train; ours evaluates, says so and stops.
    result = run_single([*args, "--tag", "no-eval", "--pretrained", run_dir / "best_ckpt.pth"])
    assert result.returncode == 0, output_of(result)
    assert "pass --finetune to train from them" in result.stdout
    assert not list((tmp_path / "tiny_test" / "no-eval").glob("*.pth"))


def test_throughput_under_the_official_launcher_exits_cleanly_on_every_rank(image_folder, tiny_cfg, tmp_path):
    args = ["--cfg", tiny_cfg, "--data-path", image_folder, "--output", tmp_path, "--tag", "tp", "--throughput",
            "--opts", "THROUGHPUT_WARMUP", "1", "THROUGHPUT_ITERS", "2"]  # fmt: skip
    result = run_torchrun(args, module="torch.distributed.launch")
    assert result.returncode == 0, output_of(result)
    measured = re.findall(r"batch_size 4 throughput ([\d.]+)\n", result.stdout)
    assert len(measured) == 1 and float(measured[0]) > 0
    assert "rank 1 has nothing to do" in (tmp_path / "tiny_test" / "tp" / "log_rank1.txt").read_text()
    assert not list((tmp_path / "tiny_test" / "tp").glob("*.pth"))


def test_two_node_launch_evaluates_the_same_accuracy(straight, image_folder, tiny_cfg, tmp_path):
    """torchrun --nnodes=2 (both "nodes" on this machine, one process each): rank 1 has LOCAL_RANK 0, the case the
    official set_device(RANK) got wrong; sharded validation must still count all 16 images once."""
    run_dir, _ = straight
    logged = load(run_dir / "best_ckpt.pth")["max_accuracy"]
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(MAIN),
                "--cfg",
                str(tiny_cfg),
                "--data-path",
                str(image_folder),
                "--output",
                str(tmp_path),
                "--tag",
                "nodes",
                "--pretrained",
                str(run_dir / "best_ckpt.pth"),
                "--eval",
            ],
            cwd=MAIN.parent,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"Accuracy of the network on the 16 test images: {logged:.1f}%" in outputs[0]
    assert "rank 1 of 2 (local rank 0)" in (tmp_path / "tiny_test" / "nodes" / "log_rank1.txt").read_text()


def test_explicit_resume_of_an_official_file_restores_the_misspelled_best_ema(straight, tmp_path):
    """An official-layout file carries only ``max_accuray_ema``: --resume must restore it (the official code reset
    it to 0) along with the epoch, and go on training."""
    run_dir, args = straight
    official = load(run_dir / "latest_ckpt.pth")
    del official["max_accuracy_ema"]
    official["max_accuray_ema"] = 99.5  # higher than anything this run reaches: it must survive the resume
    torch.save(official, tmp_path / "official.pth")
    out = ["--output", tmp_path, "--tag", "resumed"]
    result = run_single([*args, *out, "--resume", tmp_path / "official.pth", "--opts", "TRAIN.EPOCHS", "3"])
    assert result.returncode == 0, output_of(result)
    assert re.search(r"resumed at epoch 2 \(max accuracy [\d.]+%, EMA 99.50%\)", result.stdout)
    final = load(tmp_path / "tiny_test" / "resumed" / "latest_ckpt.pth")
    assert final["epoch"] == 2 and final["max_accuray_ema"] == final["max_accuracy_ema"] == 99.5
