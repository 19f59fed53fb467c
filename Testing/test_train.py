"""Diffusion training: exact resume, refused configurations, learning-rate schedule, balanced batches, DDP on CPU."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.training.train import TrainConfig, lr_at, sample_batch, train_diffusion
from CDMSegmentLib.core.unet import ConditionalUNet, UNetConfig

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"
UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=())


def data(n=12, size=16, seed=0):
    """(n, 1, size, size) uint8 slices and (n,) labels in {0, 1}, a third positive."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return images, (torch.arange(n) % 3 == 0).long()


def cfg(**changes):
    return TrainConfig(**{**dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2,
                                 precision="fp32", unet=UNET), **changes})


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one_to_the_bit(tmp_path):
    images, labels = data()
    full = train_diffusion(images, labels, cfg(), tmp_path / "full", progress=False)
    train_diffusion(images, labels, cfg(), tmp_path / "cut", progress=False, stop_after=3)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 3
    messages = []
    resumed = train_diffusion(images, labels, cfg(), tmp_path / "cut", progress=False, log=messages.append)
    assert messages[0] == "resuming at step 3" and messages[1].startswith("step 4/4, 16 samples, ")
    a, b = torch.load(full, weights_only=False), torch.load(resumed, weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
               for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    # The weights moved: the comparison above is not between two untouched initialisations.
    torch.manual_seed(0)
    init = ConditionalUNet(UNET).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)


def test_a_changed_configuration_in_the_same_run_folder_is_refused(tmp_path):
    images, labels = data()
    train_diffusion(images, labels, cfg(steps=1), tmp_path, progress=False)
    with pytest.raises(CDMSegmentError, match="another configuration; use a new run folder"):
        train_diffusion(images, labels, cfg(steps=1, lr=5e-4), tmp_path, progress=False)


def test_a_finished_run_resumed_with_more_steps_continues_on_the_longer_schedule(tmp_path):
    images, labels = data()
    train_diffusion(images, labels, cfg(steps=3), tmp_path, progress=False)
    messages = []
    path = train_diffusion(images, labels, cfg(steps=6), tmp_path, progress=False, log=messages.append)
    assert messages[0] == "resuming at step 3"
    # step 3 ends the 3-step cosine (a tenth of the peak, 1e-4); on the 6-step one it is a quarter of the way
    # down: 1e-3 * (0.1 + 0.45 * (1 + cos(pi / 4))) = 8.7e-4
    assert messages[1] == ("the schedule goes from 3 to 6 steps: the learning rate follows the longer cosine "
                           "from here (0.0001 -> 0.00087)")
    state = torch.load(path, weights_only=False)
    assert state["step"] == 6 and state["config"]["steps"] == 6
    assert [json.loads(line)["step"] for line in (tmp_path / "progress.jsonl").read_text().splitlines()] == [2, 3, 4, 6]
    with pytest.raises(CDMSegmentError, match="is already at step 6; ask for at least that many steps"):
        train_diffusion(images, labels, cfg(steps=5), tmp_path, progress=False)
    assert torch.load(path, weights_only=False)["step"] == 6


def test_labels_beyond_the_network_classes_are_refused(tmp_path):
    images, labels = data()
    labels[0] = 2
    with pytest.raises(CDMSegmentError, match="labels go up to 2 but the network knows 2 classes"):
        train_diffusion(images, labels, cfg(), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_data_with_more_channels_than_the_network_is_refused(tmp_path):
    images, labels = data()
    with pytest.raises(CDMSegmentError, match="the data has 2 channels, the network expects 1"):
        train_diffusion(images.repeat(1, 2, 1, 1), labels, cfg(), tmp_path, progress=False)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    c = TrainConfig(steps=110, lr=1e-3, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(4, c) == pytest.approx(5e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)  # last warm-up step reaches the peak
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(0.55e-3)  # half-way through the decay: 0.1 + 0.9 * 0.5
    assert lr_at(109, c) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + np.cos(np.pi * 0.99))))
    assert lr_at(110, c) == pytest.approx(1e-4) and lr_at(500, c) == pytest.approx(1e-4)


def test_balanced_batches_take_half_from_the_rare_positive_slices():
    labels = torch.zeros(50, dtype=torch.long)
    labels[[3, 17]] = 1
    g = torch.Generator().manual_seed(0)
    for batch_size in (8, 9):
        idx = sample_batch(labels, batch_size, g, balance=True)
        assert idx.shape == (batch_size,)
        assert int((labels[idx] > 0).sum()) == batch_size // 2
    unbalanced = torch.cat([sample_batch(labels, 64, g, balance=False) for _ in range(4)])
    assert int((labels[unbalanced] > 0).sum()) < 64


def test_without_positives_balance_falls_back_to_uniform_sampling():
    labels = torch.zeros(10, dtype=torch.long)
    idx = sample_batch(labels, 6, torch.Generator().manual_seed(0), balance=True)
    assert idx.shape == (6,) and int(idx.min()) >= 0 and int(idx.max()) < 10


def digest(named_parameters) -> str:
    """SHA256 over the parameters' names and bytes, in name order (the DDP script defines the same)."""
    h = hashlib.sha256()
    for name, p in sorted(named_parameters):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


DDP_SCRIPT = """
import hashlib, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {package!r})
from CDMSegmentLib.training.train import TrainConfig, diffusion_loss, train_network
from CDMSegmentLib.core.unet import ConditionalUNet, UNetConfig

def digest(named):
    h = hashlib.sha256()
    for name, p in sorted(named):
        h.update(name.encode()); h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (12, 1, 16, 16), generator=g, dtype=torch.uint8)
labels = (torch.arange(12) % 3 == 0).long()
cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=1000, precision="fp32",
                  unet=UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=()))
nets = []
build = lambda: nets.append(ConditionalUNet(cfg.unet)) or nets[-1]
train_network(build, diffusion_loss, images, labels, cfg, Path({run_dir!r}), kind="diffusion", progress=False)
rank = int(os.environ["RANK"])
Path({out!r}, f"rank{{rank}}.txt").write_text(f"{{torch.distributed.get_world_size()}} " + digest(nets[0].named_parameters()))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_in_step_and_rank_0_writes_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(package=str(PACKAGE_DIR), run_dir=str(run_dir),
                                                        out=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)],
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    world0, hash0 = (tmp_path / "rank0.txt").read_text(encoding="utf-8").split()
    world1, hash1 = (tmp_path / "rank1.txt").read_text(encoding="utf-8").split()
    assert world0 == world1 == "2"
    assert hash0 == hash1  # DDP averaged the gradients: both ranks hold the same weights
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    net = ConditionalUNet(UNET)
    net.load_state_dict(state["model"])
    assert digest(net.named_parameters()) == hash0
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "progress.jsonl", "snapshots"]


def test_the_noise_band_is_where_training_draws_its_timesteps(tmp_path, monkeypatch):
    from CDMSegmentLib.training import train as train_module

    drawn = []
    real = train_module.diffusion_loss
    monkeypatch.setattr(train_module, "diffusion_loss", lambda m, n, x_t, t, y, eps: (drawn.append(t), real(m, n, x_t, t, y, eps))[1])
    images, labels = data()
    train_diffusion(images, labels, cfg(steps=20, batch_size=8, t_range=(300, 310)), tmp_path, progress=False,
                    log=lambda m: None)
    t = torch.cat(drawn)
    assert len(t) == 160 and int(t.min()) == 300 and int(t.max()) == 310


@pytest.mark.parametrize("band", [(-1, 10), (10, 5), (0, 1000), (3,)])
def test_a_noise_band_outside_the_schedule_is_refused(band):
    with pytest.raises(CDMSegmentError, match="noise band must be LO,HI with 0 <= LO <= HI <= 999"):
        cfg(t_range=band)


def test_every_checkpoint_logs_its_progress_and_keeps_the_ema_weights(tmp_path):
    images, labels = data()
    lines = []
    seen = []
    train_diffusion(images, labels, cfg(), tmp_path, progress=False, log=lines.append,
                    on_checkpoint=lambda step, net, loss: seen.append((step, loss)) or (f"measured at {step}",
                                                                                       {"auroc": step / 10}))
    assert [s for s, _ in seen] == [2, 4] and all(loss > 0 for _, loss in seen)
    assert lines[0].startswith("step 2/4, 8 samples, 0.00 h, loss ") and lines[0].endswith(", measured at 2")
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and records[1]["samples"] == 16
    assert records[1]["held_out"] == {"auroc": 0.4} and records[1]["loss"] == pytest.approx(seen[1][1], abs=1e-5)
    ema = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["ema"]
    snapshot = torch.load(tmp_path / "snapshots" / "step-4.pt", weights_only=False)
    assert all(torch.equal(ema[k], snapshot[k]) for k in ema)


def test_auto_precision_is_fp32_on_a_cpu_without_bf16_units(monkeypatch):
    from CDMSegmentLib.training import train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    with train_module._autocast(torch.device("cpu"), "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: True)
    with train_module._autocast(torch.device("cpu"), "auto"):
        assert torch.is_autocast_enabled("cpu")
