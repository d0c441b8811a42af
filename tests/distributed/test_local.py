"""pymglu.distributed without MPI: bucket plans, the one-process communicator, the handshake's checks, and
the Trainer's data-parallel hook (through a two-rank stand-in whose other rank mirrors this one)."""
from __future__ import annotations

import numpy as np
import pytest

from pymglu.distributed import (DataParallel, DistributedError, LocalCommunicator, config_digest,
                                init_communicator)
from pymglu.distributed.buckets import plan_buckets
from pymglu.distributed.comm import Communicator
from pymglu.models import Transformer, TransformerConfig
from pymglu.models.training import Trainer, TrainSettings
from pymglu.nn import Parameter


def _tiny_model(dtype: str = "float32") -> Transformer:
    return Transformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                                         ffn_kind="swimglu", n_masks=2, max_seq_len=8, dtype=dtype), rng=0)


def test_buckets_keep_order_respect_the_cap_and_split_by_reduce_dtype():
    params = [Parameter(np.zeros(10, np.float32)), Parameter(np.zeros(30, np.float64)),
              Parameter(np.zeros(20, np.float32)), Parameter(np.zeros(100, np.float32)),
              Parameter(np.zeros(5, np.float16))]
    buckets = plan_buckets(params, bucket_bytes=160)
    layout = [([params.index(p) for p in b.params], b.dtype.name, b.offsets, b.numel) for b in buckets]
    assert layout == [([0, 2], "float32", (0, 10), 30), ([3], "float32", (0,), 100),
                      ([4], "float32", (0,), 5), ([1], "float64", (0,), 30)]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(params, 0)


def test_local_world_reduces_to_the_identity_and_keeps_missing_gradients_missing():
    model = _tiny_model()
    dp = DataParallel(model, bucket_bytes=1024, overlap=False)  # the gradient is dropped after backward
    assert dp.size == 1 and dp.is_main and len(dp.buckets) > 1
    ids = np.arange(8)[None] % 32
    model.loss(ids, ids).backward()
    before = {n: np.array(p.grad) for n, p in model.named_parameters()}
    first = model.parameters()[0]
    first.grad = None
    dp.reduce_gradients()
    assert first.grad is None
    for n, p in list(model.named_parameters())[1:]:
        np.testing.assert_array_equal(p.grad, before[n])
        assert p.grad.dtype == p.dtype
    assert dp.mean(2.5) == 2.5


def test_a_bucket_buffer_zeroes_the_missing_gradients_and_the_flags_itself(monkeypatch):
    """start_bucket does not clear its buffer first: a fresh buffer full of NaN must still reduce to the
    gradients, zeros where a parameter has none, and the presence flags."""
    import pymglu.distributed.buckets as buckets_module

    params = [Parameter(np.ones(3, np.float32)), Parameter(np.ones(4, np.float32)), Parameter(np.ones(2, np.float32))]
    params[0].grad, params[2].grad = np.arange(3, dtype=np.float32) + 1, np.full(2, 7.0, np.float32)
    (bucket,) = plan_buckets(params, bucket_bytes=1024)

    class PoisonedNumPy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype=float):
            return np.full(shape, np.nan, dtype=dtype)

    monkeypatch.setattr(buckets_module, "get_array_module", lambda *a: PoisonedNumPy())
    pending = buckets_module.start_bucket(LocalCommunicator(), bucket)
    np.testing.assert_array_equal(pending.buf, [1, 2, 3, 0, 0, 0, 0, 7, 7, 1, 0, 1])


def test_handshake_names_a_world_size_mismatch():
    dp = DataParallel(_tiny_model())
    dp.handshake("config", expected_world_size=1)
    with pytest.raises(DistributedError, match=r"world size 1 but ranks expected \[2\]"):
        dp.handshake("config", expected_world_size=2)
    assert not np.array_equal(config_digest("a"), config_digest("b")) and config_digest("a").shape == (4,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        init_communicator("gloo")
    assert isinstance(init_communicator("local"), LocalCommunicator)
    with pytest.raises(ValueError, match="broadcast_"):
        LocalCommunicator().broadcast_(np.zeros(2), root=1)


class _MirrorRank0(Communicator):
    """Rank 0 of a world of 2 whose other rank holds exactly this rank's values (a test stand-in)."""

    def __init__(self) -> None:
        self.rank, self.size, self.timeout = 0, 2, None

    def all_reduce_sum_(self, buf):
        buf *= 2
        return buf

    def broadcast_(self, buf, root=0):
        return buf

    def allgather_int64(self, values):
        return np.stack([values, values])

    def abort(self, code=1):
        raise SystemExit(code)


def _settings(**kw) -> TrainSettings:
    return TrainSettings(**{"steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1, **kw})


def test_trainer_shards_the_global_batch_and_averages_gradients():
    data = np.frombuffer(bytes(range(32)) * 32, dtype=np.uint8)
    seen = []
    model = _tiny_model()
    loss = model.loss
    model.loss = lambda x, y: (seen.append(x.shape), loss(x, y))[1]
    trainer = Trainer(model, _settings(), data, data, parallel=DataParallel(model, _MirrorRank0()))
    trainer.train_step()
    assert seen == [(2, 8)] and trainer.history.tokens == 4 * 8

    # world size 1: the same run as without the hook, bit for bit
    runs = []
    for parallel in (False, True):
        m = _tiny_model()
        t = Trainer(m, _settings(), data, data, parallel=DataParallel(m) if parallel else None)
        runs.append([t.train_step() for _ in range(3)])
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="not a multiple of the world size 2"):
        Trainer(model, _settings(batch_size=3), data, data, parallel=DataParallel(model, _MirrorRank0()))


def test_evaluate_polls_the_pending_reductions_first():
    """Validation passes may load kernels of their own, which must not queue behind a stuck reduction."""
    data = np.frombuffer(bytes(range(32)) * 32, dtype=np.uint8)
    model = _tiny_model()
    dp = DataParallel(model, _MirrorRank0())
    trainer = Trainer(model, _settings(), data, data, parallel=dp)
    order = []
    dp.synchronize = lambda in_flight=0: order.append("poll")
    loss = model.loss
    model.loss = lambda x, y: (order.append("pass"), loss(x, y))[1]
    trainer.evaluate()
    assert order and order[0] == "poll" and "pass" in order


class _RecordingComm(LocalCommunicator):
    """World size 1, recording when each reduction starts relative to the backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def all_reduce_sum_start(self, buf):
        self.events.append("start")
        return ("handle", self.events.count("start"))

    def wait(self, handle) -> None:
        self.events.append(f"wait {handle[1]}")


def test_overlap_starts_buckets_during_backward_in_order_and_matches_no_overlap():
    ids = np.arange(8)[None] % 32
    grads = {}
    for overlap in (False, True):
        model = _tiny_model()
        comm = _RecordingComm()
        dp = DataParallel(model, comm, bucket_bytes=1024, overlap=overlap)
        loss = model.loss(ids, ids)
        model.embed.weight.register_grad_hook(lambda p: comm.events.append("embedding grad"))
        loss.backward()
        started_in_backward = comm.events.count("start")
        dp.reduce_gradients()
        assert comm.events.count("start") == len(dp.buckets)
        assert [e for e in comm.events if e.startswith("wait")] == [f"wait {k}" for k in range(1, len(dp.buckets) + 1)]
        if overlap:
            # the embedding (first parameter) gets its gradient last: every other bucket started before it
            assert started_in_backward == len(dp.buckets)
            assert comm.events.index("embedding grad") > comm.events.index("start")
        else:
            assert started_in_backward == 0
        grads[overlap] = {n: np.array(p.grad) for n, p in model.named_parameters()}
        dp.detach_hooks()
    for n in grads[False]:
        np.testing.assert_array_equal(grads[True][n], grads[False][n], err_msg=n)


class _ConfirmingComm(_RecordingComm):
    """A communicator that, like NCCL's, wants the first step's reductions seen complete on the host."""

    confirm_first_step = True

    def check_pending(self, in_flight: int = 0) -> None:
        self.events.append("host wait")


def test_a_confirming_communicator_gets_a_first_step_without_overlap_and_a_host_wait():
    """With ``confirm_first_step`` (NCCL) the first step starts no bucket during backward and waits for its
    reductions on the host before dividing; from the second step on, buckets start during backward and
    the host does not wait."""
    ids = np.arange(8)[None] % 32
    model = _tiny_model()
    comm = _ConfirmingComm()
    dp = DataParallel(model, comm, bucket_bytes=1024)
    assert not dp.confirmed and len(dp.buckets) > 1
    for step in range(2):
        comm.events.clear()
        model.zero_grad()
        model.loss(ids, ids).backward()
        started_in_backward = comm.events.count("start")
        dp.reduce_gradients()
        waits = [e for e in comm.events if e.startswith("wait")]
        assert comm.events.count("start") == len(dp.buckets) and len(waits) == len(dp.buckets)
        if step == 0:
            assert started_in_backward == 0
            assert comm.events[-1] == "host wait" and comm.events.index("host wait") > comm.events.index(waits[-1])
        else:
            assert started_in_backward == len(dp.buckets) and "host wait" not in comm.events
        assert dp.confirmed
    assert DataParallel(_tiny_model(), _RecordingComm()).confirmed  # MPI and the local world: nothing to confirm


def test_overlap_refuses_a_second_backward_before_the_reduction():
    model = _tiny_model()
    dp = DataParallel(model, bucket_bytes=1024)
    ids = np.arange(8)[None] % 32
    model.loss(ids, ids).backward()
    with pytest.raises(DistributedError, match="overlap=False"):
        model.loss(ids, ids).backward()
    dp.detach_hooks()
    model.loss(ids, ids).backward()  # without the hooks nothing is started
