"""Trainer: the loss falls, validation is recorded, and a resumed run continues exactly."""
import numpy as np
import pytest

from pymglu import io
from pymglu.models import Transformer, TransformerConfig
from pymglu.models.checkpoint import ConfigMismatchError, load_training_checkpoint, save_training_checkpoint
from pymglu.models.data import split_corpus
from pymglu.models.training import Trainer, TrainSettings

DATA = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 100).encode(), dtype=np.uint8)


def make(kind="swimglu", steps=8, seed=0, **cfg):
    config = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=24, ffn_kind=kind, max_seq_len=16, **cfg)
    train, val = split_corpus(DATA, 16)
    settings = TrainSettings(steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=2, seed=seed)
    return Trainer(Transformer(config, rng=seed), settings, train, val)


def test_loss_falls_and_history():
    trainer = make(steps=40)
    history = trainer.run(progress=False, log=None)
    assert trainer.step == 40 and len(history.train_loss) == 40
    assert history.val_steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert np.mean(history.train_loss[-5:]) < 0.7 * np.mean(history.train_loss[:5])
    assert history.val_loss[-1] < history.val_loss[0]
    assert history.tokens == 40 * 4 * 16 and history.tokens_per_second > 0


def test_resume_continues_exactly(tmp_path):
    straight = make(steps=8)
    straight.run(progress=False, log=None)

    first = make(steps=8)
    for _ in range(5):
        first.train_step()
    path = tmp_path / "ckpt.safetensors"
    save_training_checkpoint(path, first)
    resumed = make(steps=8, seed=123)          # other init and sampler seed: both come from the file
    load_training_checkpoint(path, resumed)
    assert resumed.step == 5
    resumed.run(progress=False, log=None)
    assert resumed.history.train_loss == straight.history.train_loss
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_resume_into_other_model_changes_nothing(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    trainer = make(steps=4)
    trainer.train_step()
    save_training_checkpoint(path, trainer)
    before = path.read_bytes()
    other = make(kind="swiglu", steps=4)
    params = [p.data.copy() for p in other.model.parameters()]
    with pytest.raises(ConfigMismatchError, match="ffn_kind: 'swimglu' != 'swiglu'"):
        load_training_checkpoint(path, other)
    assert path.read_bytes() == before and other.step == 0
    assert all(np.array_equal(a, p.data) for a, p in zip(params, other.model.parameters()))
    with pytest.raises(ConfigMismatchError, match="n_masks: 4 != 2"):
        load_training_checkpoint(path, make(steps=4, n_masks=2))


def test_foreign_or_broken_checkpoints(tmp_path):
    plain = tmp_path / "plain.safetensors"
    io.save_checkpoint(plain, make().model)
    with pytest.raises(io.CheckpointError, match="no language-model config"):
        load_training_checkpoint(plain, make())
    broken = tmp_path / "broken.safetensors"
    trainer = make()
    save_training_checkpoint(broken, trainer, extra={})
    data = broken.read_bytes()
    broken.write_bytes(data.replace(b'"train.step":"0"', b'"train.step":"x"'))
    fresh = make()
    with pytest.raises(io.CheckpointError, match="training state"):
        load_training_checkpoint(broken, fresh)
    assert fresh.optimizer.state == {}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_resumes(tmp_path, dtype):
    """16-bit models: fp32 master weights in the optimizer, a loss scaler for float16 whose state is
    checkpointed; the loss falls like the float32 twin's and a resumed run continues exactly."""
    straight = make(steps=30, dtype=dtype)
    assert (straight.scaler is not None) == (dtype == "float16")
    history = straight.run(progress=False, log=None)
    twin = make(steps=30).run(progress=False, log=None)
    assert history.val_loss[-1] < 0.6 * history.val_loss[0]
    assert abs(history.val_loss[-1] - twin.val_loss[-1]) < 0.05 * twin.val_loss[-1]
    assert straight.model.embed.weight.dtype.name == dtype
    assert any("master" in st for st in straight.optimizer.state.values())

    first = make(steps=30, dtype=dtype)
    for _ in range(12):
        first.train_step()
    if first.scaler is not None:
        first.scaler.growth_tracker = 3      # a state that a fresh scaler would not have
    path = tmp_path / "ckpt.safetensors"
    save_training_checkpoint(path, first)
    resumed = make(steps=30, dtype=dtype)
    load_training_checkpoint(path, resumed)
    if dtype == "float16":
        assert resumed.scaler.state_dict() == first.scaler.state_dict()
    first.run(progress=False, log=None)
    resumed.run(progress=False, log=None)
    assert resumed.history.train_loss == first.history.train_loss


def test_unsynchronised_steps_record_the_same_losses_at_flush():
    synced, lazy = make(steps=6), make(steps=6)
    want = [synced.train_step() for _ in range(5)]
    assert all(lazy.train_step(sync=False) is None for _ in range(4))
    assert lazy.history.train_loss == [] and lazy.step == 4
    assert lazy.train_step() == want[-1]  # a synchronised step flushes the pending ones first
    assert lazy.history.train_loss == want
    assert lazy.flush() is None
    lazy.sync_every = 4
    lazy.run(progress=False, log=None)
    assert len(lazy.history.train_loss) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype", [("swimglu", "bfloat16"), ("swiglu", "float32"), ("swimglu", "float16")])
def test_gpu_steps_never_wait_for_the_device(kind, dtype, busy_gpu):
    """Behind a kernel that keeps the GPU busy for two seconds, two training steps are queued before it
    ends: no op of the step reads a device value back (ids, targets, loss, clipping, optimizer). With a
    captured graph (the bfloat16 and float16 models) the two are replays; the capture itself may wait
    (pinned host buffers are allocated for it)."""
    config = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=24, ffn_kind=kind, max_seq_len=16, dtype=dtype)
    train, val = split_corpus(DATA, 16)
    settings = TrainSettings(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, eval_batches=1)
    trainer = Trainer(Transformer(config, rng=0).to("cuda"), settings, train, val)
    first = trainer.train_step()  # compiles the kernels and allocates the optimizer state
    if trainer.graph_step is not None:
        trainer.train_step()  # the capture
    busy = busy_gpu(2.0)
    trainer.train_step(sync=False)
    trainer.train_step(sync=False)
    queued_while_busy = not busy.done
    trainer.flush()
    assert queued_while_busy, "a training step waited for the device"
    losses = trainer.history.train_loss
    assert len(losses) == 3 + (trainer.graph_step is not None) and losses[0] == first and all(np.isfinite(losses))
    assert trainer.graph_step is None or trainer.graph_step.captures == 1
