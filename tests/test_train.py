"""ECLIP training: the loss falls, checkpoints load, a killed run resumes to the same weights,
and two torchrun processes equal one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import subprocess_env, torchrun_two
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipviz import ClipvizError
from clipviz.cli import app
from clipviz.data.captions import read_captions
from clipviz.eclip.config import TrainConfig
from clipviz.eclip.head import load_head
from clipviz.eclip.schedule import GlobalBatches, epoch_order, learning_rate
from clipviz.eclip.state import Dist
from clipviz.eclip.train import CHECKPOINT, FINAL, METRICS, train
from clipviz.methods.eclip import eclip
from clipviz.methods.itsm import itsm
from clipviz.testbed.world import write_captions_csv

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """32 synthetic scenes at 64 px: `captions.csv` (`filepath,caption`) and `images/`."""
    root = tmp_path_factory.mktemp("world")
    write_captions_csv(root, 32, seed=0, size=64)
    return root / "captions.csv"


def _model_args(tiny_weights, tower="vit"):
    config, weights = tiny_weights[tower]
    return ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu"]


def _head_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("head.")}


def test_loss_falls_checkpoint_loads_and_maps_leave_stock_itsm(vit_backend, world, tmp_path):
    data = read_captions(world)
    config = TrainConfig(batch_size=16, steps=30, lr=1e-2, log_every=1, checkpoint_every=10)
    result = train(vit_backend, data, tmp_path / "run", config, val=data)
    logs = [r for r in map(json.loads, (tmp_path / "run" / METRICS).open()) if "loss" in r]
    losses = [r["loss"] for r in logs]
    assert len(losses) == 30 and result.steps == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert [r["lr"] for r in logs][0] == pytest.approx(1e-2)  # cosine from the peak
    vals = [r for r in map(json.loads, (tmp_path / "run" / METRICS).open()) if "val_top1" in r]
    assert [r["step"] for r in vals] == [10, 20, 30] and vals[-1]["val_images"] == 32

    final = tmp_path / "run" / FINAL
    head = load_head(vit_backend, final)
    assert not torch.allclose(head.proj, vit_backend.model.visual.proj)
    with safe_open(str(final), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "final" and meta["step"] == "30"
    assert json.loads(meta["config"])["mask_rule"] == "mean"

    images = torch.stack([vit_backend.preprocess(_image(p)) for p in data.images[:4]])
    texts = vit_backend.encode_texts(["a red circle", "a blue square"], ensemble=False)
    stock = itsm(vit_backend, images, texts).maps
    trained = eclip(vit_backend, images, texts, checkpoint=str(final)).maps
    assert stock.shape == trained.shape == (4, 2, 4, 4)
    assert (trained - stock).abs().max() > 0.05


def _image(path):
    from clipviz.data.images import load_image

    return load_image(path)


def test_rn_tower_with_an_unreadable_image_trains_and_counts_it(rn_backend, world, tmp_path):
    data = read_captions(world)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data.add(bad, "a broken file")
    config = TrainConfig(batch_size=11, epochs=1, workers=1, lr=1e-2)  # 33 pairs: 3 batches
    result = train(rn_backend, data, tmp_path / "run", config)
    assert result.steps == 3 and result.unreadable == 1
    end = [json.loads(line) for line in (tmp_path / "run" / METRICS).open()][-1]
    assert end["event"] == "end" and end["unreadable"] == 1
    head = load_head(rn_backend, tmp_path / "run" / FINAL)
    assert sorted(head.state_dict()) == ["bias", "proj"]


def test_a_checkpoint_for_another_base_model_is_refused(vit_backend, rn_backend, world, tmp_path):
    data = read_captions(world)
    train(vit_backend, data, tmp_path / "run", TrainConfig(batch_size=16, steps=1))
    with pytest.raises(ClipvizError, match=r"trained for tiny-vit .*loaded model is tiny-rn"):
        load_head(rn_backend, tmp_path / "run" / FINAL)
    with pytest.raises(ClipvizError, match=r"trained for tiny-vit .*loaded model is tiny-rn"):
        train(rn_backend, data, tmp_path / "run", TrainConfig(batch_size=16, steps=1), resume=True)
    with pytest.raises(ClipvizError, match=r"lr=0\.001 \(now 0\.5\)"):
        train(vit_backend, data, tmp_path / "run", TrainConfig(16, steps=1, lr=0.5), resume=True)
    with pytest.raises(ClipvizError, match="already holds a training run"):
        train(vit_backend, data, tmp_path / "run", TrainConfig(batch_size=16, steps=1))


def test_data_order_depends_only_on_seed_and_epoch_and_ranks_split_each_batch():
    assert (epoch_order(10, 3, 1) == epoch_order(10, 3, 1)).all()
    assert not (epoch_order(10, 3, 1) == epoch_order(10, 3, 2)).all()
    whole = list(GlobalBatches(10, 4, seed=3, start=0, stop=5, d=Dist()))
    assert len(whole) == 5 and all(len(b) == 4 for b in whole)  # 2 per epoch, last 2 dropped
    assert sorted(whole[0] + whole[1]) == sorted(epoch_order(10, 3, 0)[:8].tolist())
    shards = [list(GlobalBatches(10, 4, 3, 0, 5, Dist(r, 2))) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards, strict=True)] == whole
    assert list(GlobalBatches(10, 4, 3, 3, 5, Dist())) == whole[3:]  # resuming mid-way


def test_learning_rate_warms_up_then_follows_a_cosine():
    config = TrainConfig(lr=1.0, warmup=4)
    assert [learning_rate(s, 14, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, 14, config) == pytest.approx(0.5)
    assert learning_rate(14, 14, config) == pytest.approx(0.0)
    assert learning_rate(9, 14, TrainConfig(lr=1.0, schedule="constant")) == 1.0


def test_kill_after_a_checkpoint_then_resume_gives_the_uninterrupted_weights(
    tiny_weights, world, tmp_path
):
    options = ["--batch-size", "8", "--accum-steps", "2", "--steps", "80", "--lr", "1e-2",
               "--warmup", "5", "--learnable-scale", "--distill", "0.1", "--workers", "0",
               "--log-every", "1", "-q", *_model_args(tiny_weights)]  # fmt: skip
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipviz", "train", str(world), "--out", str(killed),
         "--checkpoint-every", "2", *options],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (killed / CHECKPOINT).exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / FINAL).exists()
    step = int(load_file(str(killed / CHECKPOINT))["train.step"])
    assert 2 <= step < 80

    resumed = runner.invoke(
        app, ["train", str(world), "--out", str(killed), "--resume", "--checkpoint-every", "7",
              *options],
    )  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    straight = runner.invoke(
        app, ["train", str(world), "--out", str(tmp_path / "straight"), *options]
    )
    assert straight.exit_code == 0, straight.output
    a, b = _head_tensors(killed / FINAL), _head_tensors(tmp_path / "straight" / FINAL)
    assert a.keys() == b.keys() == {"head.proj"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (killed / METRICS).open()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 81))  # no duplicated steps


def test_torchrun_with_two_processes_equals_one_process(tiny_weights, world, tmp_path):
    rows = world.read_text(encoding="utf-8").splitlines()
    rows[1:] = [f"{world.parent / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in rows[1:]]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows[5] = f"{tmp_path / 'broken.png'},a broken file"  # in every epoch, on one rank
    data = tmp_path / "pairs.csv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    options = ["--batch-size", "16", "--steps", "4", "--lr", "1e-2", "--learnable-scale",
               "--distill", "0.5", "--workers", "0", "--log-every", "1", "-q",
               *_model_args(tiny_weights)]  # fmt: skip
    proc = torchrun_two(["train", str(data), "--out", str(tmp_path / "ddp"), *options])
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "one"), *options])
    assert single.exit_code == 0, single.output
    ddp, one = (
        load_file(str(tmp_path / "ddp" / CHECKPOINT)),
        load_file(str(tmp_path / "one" / CHECKPOINT)),
    )
    assert ddp.keys() == one.keys()
    for k in one:
        if not k.startswith("rng."):
            torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
    assert not torch.equal(one["head.proj"], load_file(str(tiny_weights["vit"][1]))["visual.proj"])
    logs = [[json.loads(line) for line in (tmp_path / d / METRICS).open()] for d in ("ddp", "one")]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert logs[0][-1]["unreadable"] == logs[1][-1]["unreadable"] == 1
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2


def test_cli_usage_errors_are_one_line_with_exit_2(tiny_weights, world, tmp_path):
    base = ["train", str(world), "--out", str(tmp_path / "run"), *_model_args(tiny_weights)]
    both = runner.invoke(app, [*base, "--epochs", "1", "--steps", "2"])
    assert both.exit_code == 2 and "--epochs or --steps" in both.output
    big = runner.invoke(app, [*base, "--batch-size", "64"])
    assert big.exit_code == 2 and "32 usable pairs" in big.output
    nothing = runner.invoke(app, [*base, "--resume", "--batch-size", "8"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    topk = runner.invoke(app, [*base, "--mask-rule", "topk", "--batch-size", "8"])
    assert topk.exit_code == 2 and "topk needs a share" in topk.output
    for result in (both, big, nothing, topk):
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("family", ["convnext", "fastvit"])
def test_training_on_a_tower_without_free_attention_is_refused_before_any_work(
    family, family_backends, world, tmp_path
):
    backend = family_backends(family)
    with pytest.raises(ClipvizError, match="ECLIP needs free attention") as err:
        train(backend, read_captions(world), tmp_path / "run", TrainConfig(batch_size=16, steps=1))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["vit", "map", "pe", "eva", "hf-clip", "hf-siglip"])
def test_an_untrained_explain_head_gives_the_itsm_map(family, family_backends):
    """The explain projection starts as a copy of the tower's last linear map (or the
    identity after SigLIP's probe): before any step, ECLIP's features are ITSM's tokens (ResNets
    differ by design: their explain features are the pool's value path)."""
    from clipviz.eclip.head import ExplainHead, frozen_features
    from clipviz.explanation import explain as run

    backend = family_backends(family)
    images = torch.stack([backend.preprocess(_image_of(i)) for i in range(2)])
    head = ExplainHead(backend).to(backend.device)
    with torch.no_grad():
        e = head.features(frozen_features(backend, images).tokens)  # [B, N, D]
    tokens = backend.dense_tokens(images)[:, 1:]
    torch.testing.assert_close(e, tokens, atol=2e-5, rtol=1e-4)
    itsm_maps = run(backend, images, ["a dog", "grass"], ensemble=False).maps
    assert itsm_maps.shape[-2] * itsm_maps.shape[-1] == e.shape[1]


def _image_of(seed):
    from conftest import random_image

    return random_image(seed=seed)


@pytest.mark.parametrize("family", ["map", "hf-siglip"])
def test_eclip_on_a_siglip_tower_trains_with_the_sigmoid_loss(
    family, family_backends, world, tmp_path
):
    from clipviz.eclip.losses import sigmoid_loss
    from clipviz.eclip.objective import pooled_embeddings

    backend = family_backends(family)
    assert backend.logit_bias is not None
    data = read_captions(world)
    config = TrainConfig(batch_size=16, steps=12, lr=1e-2, log_every=1)
    train(backend, data, tmp_path / "run", config)
    logs = [r for r in map(json.loads, (tmp_path / "run" / METRICS).open()) if "loss" in r]
    losses = [r["loss"] for r in logs]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    head = load_head(backend, tmp_path / "run" / FINAL)
    # the logged loss is SigLIP's: recompute the first step's from the start head
    from clipviz.eclip.head import ExplainHead
    from clipviz.eclip.objective import TextBank

    start = ExplainHead(backend)
    images = torch.stack([backend.preprocess(_image(p)) for p in data.images[:16]])
    z, _ = pooled_embeddings(backend, start, images, config)
    ids = torch.tensor(data.caption_ids[:16])
    text = TextBank(backend, data.captions)(data.caption_ids[:16])
    expected = sigmoid_loss(z, text, backend.logit_scale, backend.logit_bias, ids)
    # another batch of the same data: close to it, and far above InfoNCE's ln(16) ≈ 2.8
    assert losses[0] == pytest.approx(expected.item(), rel=0.25) and losses[0] > 6
    texts = backend.encode_texts(["a red circle", "a blue square"], ensemble=False)
    trained = eclip(backend, images[:4], texts, checkpoint=str(tmp_path / "run" / FINAL)).maps
    assert (trained - itsm(backend, images[:4], texts).maps).abs().max() > 1e-3
    assert not torch.allclose(head.proj, torch.eye(head.proj.shape[0]))
