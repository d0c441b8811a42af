"""GraphTrainStep: the Trainer's steps replayed from a captured CUDA graph, against the eager steps."""
import numpy as np
import pytest

from pymglu.models import Transformer, TransformerConfig
from pymglu.models.data import split_corpus
from pymglu.models.training import Trainer, TrainSettings
from pymglu.cuda import optimizers as fused

DATA = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 100).encode(), dtype=np.uint8)


def make(kind="swimglu", steps=10, device=None, graph=None, dtype="bfloat16", eval_every=5, parallel=None):
    config = TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, ffn_kind=kind, max_seq_len=16, dtype=dtype)
    model = Transformer(config, rng=0)
    if device:
        model.to(device)
    train, val = split_corpus(DATA, 16)
    settings = TrainSettings(steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=eval_every,
                             eval_batches=2, seed=0)
    return Trainer(model, settings, train, val, graph=graph, parallel=parallel(model) if parallel else None)


def test_graph_needs_a_model_on_a_gpu():
    assert make(dtype="float32").graph_step is None  # auto: the CPU model steps eagerly
    with pytest.raises(ValueError, match="graph: .*cannot be captured.*not on a GPU"):
        make(dtype="float32", graph=True)
    with pytest.raises(TypeError, match="graph: expected None, True or False, got 'yes'"):
        make(graph="yes")


def test_replayed_step_does_the_host_side_of_a_step():
    trainer = make(dtype="float32", eval_every=0)
    trainer.train_step()
    opt = trainer.optimizer
    with_grad = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    steps = {id(p): opt.state[id(p)]["step"] for p in with_grad}
    versions = {id(p): p.version for p in with_grad}
    rows = opt.next_step_scalars()
    assert [p for p, _ in rows] == with_grad
    for p, row in rows:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        wd = group["weight_decay"] if p.decay else 0.0
        np.testing.assert_array_equal(row, fused.adamw_scalars(lr=group["lr"], beta1=group["betas"][0],
                                                               beta2=group["betas"][1], weight_decay=wd,
                                                               step=steps[id(p)] + 1))
        assert (row[2] == 1.0) == (wd == 0.0)
    opt.replayed_step()
    assert all(opt.state[id(p)]["step"] == steps[id(p)] + 1 for p in with_grad)
    assert all(p.version == versions[id(p)] + 1 for p in with_grad)


def _masters(trainer):
    opt = trainer.optimizer
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(id(p), {})
            out.append(np.asarray((st["master"] if "master" in st else p.data).get(), dtype=np.float64))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype", [("swimglu", "bfloat16"), ("swiglu", "bfloat16"), ("swimglu", "float32")])
def test_graph_steps_follow_the_eager_steps(kind, dtype, monkeypatch):
    eager = make(kind, device="cuda", graph=False, dtype=dtype)
    graph = make(kind, device="cuda", graph=True, dtype=dtype)
    assert eager.graph_step is None and graph.graph_step is not None
    start = _masters(eager)
    eager.run(progress=False, log=None)
    calls = []
    real = fused.adamw_step
    monkeypatch.setattr(fused, "adamw_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    graph.run(progress=False, log=None)
    assert graph.graph_step.captures == 1
    n_params = len(list(graph.model.parameters()))
    assert len(calls) == 2 * n_params  # the eager first step and the recorded one; 8 replays launch none
    tol = 1e-2 if dtype == "bfloat16" else 1e-4
    np.testing.assert_allclose(graph.history.train_loss, eager.history.train_loss, rtol=tol)
    np.testing.assert_allclose(graph.history.val_loss, eager.history.val_loss, rtol=tol)
    for p0, pe, pg in zip(start, _masters(eager), _masters(graph)):
        # the updates agree: a learning rate frozen at the captured step would make them differ by far more
        assert np.linalg.norm(pg - pe) <= 50 * tol * np.linalg.norm(pe - p0)
    opt = graph.optimizer
    assert {st["step"] for st in opt.state.values()} == {10}
    for layer in graph.model.mglu_layers():
        from pymglu.masks import pack_masks

        np.testing.assert_array_equal(layer._current_packed().get(), pack_masks(layer.mask_logits.data).get())


@pytest.mark.gpu
def test_float16_graph_steps_skip_on_the_device_as_the_eager_steps_do(monkeypatch):
    """A run whose scale overflows, backs off, grows and overflows again: the replays skip the same steps
    as the eager trainer (which reads the flag on the host), with the same scales, losses and updates."""
    from pymglu.amp import DynamicLossScaler

    steps = 16
    eager = make("swimglu", steps=steps, device="cuda", graph=False, dtype="float16", eval_every=0)
    graph = make("swimglu", steps=steps, device="cuda", graph=True, dtype="float16", eval_every=0)
    for trainer in (eager, graph):
        trainer.scaler = DynamicLossScaler(init_scale=2.0 ** 40, backoff_factor=2.0 ** -8, growth_factor=2.0 ** 8,
                                           growth_interval=2)
    start = _masters(eager)
    calls = []
    real = fused.adamw_step
    history = {"eager": [], "graph": []}
    for name, trainer in (("eager", eager), ("graph", graph)):
        if name == "graph":
            monkeypatch.setattr(fused, "adamw_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        for _ in range(steps):
            trainer.train_step()
            history[name].append((trainer.scaler.get_scale(), trainer.scaler.skipped_steps))
    assert history["graph"] == history["eager"]
    skipped = history["graph"][-1][1]
    clean_then_skip = any(b[1] > a[1] and a[1] == c[1] for c, a, b in zip(history["graph"], history["graph"][1:],
                                                                          history["graph"][2:]))
    assert skipped >= 3 and clean_then_skip and graph.scaler.on_device and not eager.scaler.on_device
    assert graph.graph_step.captures == 1
    assert len(calls) == 2 * len(list(graph.model.parameters()))  # eager first step and the recorded one
    np.testing.assert_allclose(graph.history.train_loss, eager.history.train_loss, rtol=2e-2)
    for p0, pe, pg in zip(start, _masters(eager), _masters(graph)):
        assert np.linalg.norm(pg - pe) <= 0.5 * np.linalg.norm(pe - p0)
    assert {st["step"] for st in eager.optimizer.state.values()} == {steps - skipped}
    graph.optimizer.settle_steps()  # the replays counted on the device
    assert {st["step"] for st in graph.optimizer.state.values()} == {steps - skipped}
    for layer in graph.model.mglu_layers():
        from pymglu.masks import pack_masks

        np.testing.assert_array_equal(layer._current_packed().get(), pack_masks(layer.mask_logits.data).get())


@pytest.mark.gpu
def test_float16_graph_checkpoints_carry_the_state_kept_on_the_device(tmp_path):
    """A checkpoint of a float16 graph trainer holds the scale, the skipped steps and the step counts that
    the device kept; loaded into a fresh trainer and back into the running one, both continue alike."""
    from pymglu.amp import DynamicLossScaler
    from pymglu.models.checkpoint import load_training_checkpoint, save_training_checkpoint

    def trainer():
        t = make("swimglu", steps=40, device="cuda", dtype="float16", eval_every=0)
        t.scaler = DynamicLossScaler(init_scale=2.0 ** 40, backoff_factor=2.0 ** -8, growth_factor=2.0 ** 8,
                                     growth_interval=3)
        return t

    first = trainer()
    for _ in range(10):
        first.train_step(sync=False)
    first.flush()
    assert first.scaler.on_device and first.graph_step.captures == 1
    path = tmp_path / "ckpt.safetensors"
    save_training_checkpoint(path, first)
    saved = first.scaler.state_dict()
    steps = {st["step"] for st in first.optimizer.state.values()}  # settled by the checkpoint's state_dict
    assert saved["skipped_steps"] >= 2 and steps == {10 - saved["skipped_steps"]}
    resumed = trainer()
    load_training_checkpoint(path, resumed)
    assert resumed.scaler.state_dict() == saved
    for _ in range(5):  # the running trainer moves on, then goes back to the checkpoint
        first.train_step()
    load_training_checkpoint(path, first)
    assert first.scaler.state_dict() == saved
    assert {st["step"] for st in first.optimizer.state.values()} == steps
    a = [first.train_step() for _ in range(8)]
    b = [resumed.train_step() for _ in range(8)]
    np.testing.assert_allclose(a, b, rtol=2e-2)
    assert first.scaler.state_dict() == resumed.scaler.state_dict()
    first.optimizer.settle_steps()
    resumed.optimizer.settle_steps()
    assert {st["step"] for st in first.optimizer.state.values()} == \
        {st["step"] for st in resumed.optimizer.state.values()} == {18 - first.scaler.skipped_steps}


class _Uncapturable:
    """A DataParallel stand-in whose communicator cannot record its reductions (as MPI's cannot)."""

    def __init__(self, model):
        from pymglu.distributed import DataParallel
        from pymglu.distributed.comm import LocalCommunicator

        class Comm(LocalCommunicator):
            capturable = False

        self.inner = DataParallel(model, Comm())
        self.size, self.comm = 1, self.inner.comm

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [True, False])
def test_data_parallel_steps_are_recorded_with_their_reductions(overlap):
    """The one-process world (its reductions are copies into the bucket buffers): the recorded step with
    the reductions follows the eager data-parallel trainer, and every replay is watched."""
    from pymglu.distributed import DataParallel

    def parallel(model):
        return DataParallel(model, overlap=overlap)

    eager = make(device="cuda", graph=False, parallel=parallel, eval_every=0)
    graph = make(device="cuda", graph=True, parallel=parallel, eval_every=0)
    watched = []
    real = graph.parallel.watch_replay
    graph.parallel.watch_replay = lambda stream: (watched.append(stream), real(stream))[1]
    start = _masters(eager)
    eager.run(progress=False, log=None)
    graph.run(progress=False, log=None)
    assert graph.graph_step.captures == 1 and len(watched) == 9  # the recorded step's launch and 8 replays
    np.testing.assert_allclose(graph.history.train_loss, eager.history.train_loss, rtol=1e-2)
    for p0, pe, pg in zip(start, _masters(eager), _masters(graph)):
        assert np.linalg.norm(pg - pe) <= 0.5 * np.linalg.norm(pe - p0)
    with pytest.raises(ValueError, match=r"communicator \(Comm\) cannot record its reductions"):
        make(device="cuda", graph=True, parallel=_Uncapturable)
    assert make(device="cuda", parallel=_Uncapturable).graph_step is None  # auto: eager


@pytest.mark.gpu
def test_the_communicator_can_drop_the_recorded_graph_before_it_aborts():
    """NCCL's abort waits until every graph holding its kernels is destroyed, so the graph step hands the
    communicator a release; after it, the graph is gone, and the trainer steps eagerly, then records again."""
    from pymglu.distributed import DataParallel
    from pymglu.distributed.comm import LocalCommunicator

    releases = []

    class Comm(LocalCommunicator):
        def register_graph_release(self, release):
            releases.append(release)

    trainer = make(device="cuda", graph=True, parallel=lambda m: DataParallel(m, Comm()), eval_every=0)
    for _ in range(3):
        trainer.train_step()
    assert trainer.graph_step.captures == 1 and trainer.graph_step.graph is not None and len(releases) == 1
    releases[0]()
    assert trainer.graph_step.graph is None
    for _ in range(2):
        trainer.train_step()
    assert trainer.graph_step.captures == 2 and trainer.graph_step.graph is not None
    assert np.isfinite(trainer.history.train_loss).all()


@pytest.mark.gpu
def test_graph_is_recorded_again_after_a_parameter_changes():
    graph, eager = make(device="cuda", steps=20, eval_every=0), make(device="cuda", steps=20, graph=False, eval_every=0)
    for t in (graph, eager):
        for _ in range(4):
            t.train_step()
        w = t.model.embed.weight
        w.data = (w.data * 0.5).astype(w.dtype)  # a new array: the recorded graph no longer points at it
    assert graph.graph_step.captures == 1
    graph.train_step()
    eager.train_step()
    assert graph.graph_step.captures == 1 and graph.graph_step.graph is None  # an eager step
    for t in (graph, eager):
        for _ in range(3):
            t.train_step()
    assert graph.graph_step.captures == 2
    np.testing.assert_allclose(graph.history.train_loss, eager.history.train_loss, rtol=1e-2)
    for change in (lambda t: setattr(t.settings, "grad_clip", 0.5), lambda t: t.model.set_recompute(True)):
        for t in (graph, eager):
            change(t)
            for _ in range(2):
                t.train_step()
        assert graph.graph_step.graph is not None
    assert graph.graph_step.captures == 4  # each change: one eager step, then a new recording
    np.testing.assert_allclose(graph.history.train_loss, eager.history.train_loss, rtol=1e-2)


@pytest.mark.gpu
def test_a_failed_capture_leaves_the_optimizer_as_it_was():
    trainer = make(device="cuda", eval_every=0)
    trainer.train_step()  # the eager first step
    steps = {k: st["step"] for k, st in trainer.optimizer.state.items()}
    real = trainer.graph_step.body

    def failing(x, y):
        real(x, y)  # records the whole step, its host side included, then fails
        raise ValueError("boom")

    trainer.graph_step.body = failing
    with pytest.raises(RuntimeError, match=r"capturing the training step failed \(ValueError: boom\).*graph=False"):
        trainer.train_step()
    assert {k: st["step"] for k, st in trainer.optimizer.state.items()} == steps
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.step == 1 and len(trainer.history.train_loss) == 1
    trainer.graph_step.body = real
    for _ in range(3):  # eager again, then a capture and a replay
        trainer.train_step()
    assert trainer.graph_step.captures == 1
    assert {st["step"] for st in trainer.optimizer.state.values()} == {4}


def _eager_validation_loss(trainer):
    from pymglu.autograd.function import no_grad

    trainer.model.eval()
    total = count = 0.0
    with no_grad():
        for x, y in trainer._eval_set:
            total += float(trainer.model.loss(trainer.xp.asarray(x), trainer.xp.asarray(y)).item()) * x.size
            count += x.size
    trainer.model.train()
    return total / count


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["swimglu", "swiglu"])
def test_recorded_validation_passes_give_the_eager_losses(kind):
    trainer = make(kind, device="cuda", steps=12, eval_every=0)
    for round_ in range(4):
        for _ in range(2):
            trainer.train_step()  # eager, captured, then replays: parameters and masks change in place
        got, want = trainer.evaluate(), _eager_validation_loss(trainer)
        assert got == pytest.approx(want, rel=1e-6), round_
    assert trainer._graph_eval.captures == 1  # recorded at the first evaluation's second batch, then replayed
    w = trainer.model.embed.weight
    w.data = w.data.copy()  # a new array: the recorded pass no longer reads it
    assert trainer.evaluate() == pytest.approx(_eager_validation_loss(trainer), rel=1e-6)
    assert trainer.evaluate() == pytest.approx(_eager_validation_loss(trainer), rel=1e-6)
    assert trainer._graph_eval.captures == 2


@pytest.mark.gpu
def test_the_eager_and_the_recorded_steps_share_one_pool():
    """The eager first step allocates from the graph's pool, so the capture reuses its freed buffers
    instead of the device holding an eager step's buffers in the default pool besides the graph's."""
    import cupy as cp

    trainer = make(device="cuda", eval_every=0)
    pool, default = trainer.graph_step.pool, cp.get_default_memory_pool()
    used_before = default.used_bytes()
    trainer.train_step()  # eager
    assert pool.used_bytes() > 0  # the optimizer state and the gradients
    for _ in range(3):  # captured, then replayed
        trainer.train_step()
    trainer.flush()
    assert default.used_bytes() - used_before < 0.1 * pool.used_bytes()


def test_data_parallel_objects_the_graph_cannot_record():
    from pymglu.distributed import DataParallel
    from pymglu.distributed.comm import LocalCommunicator
    from pymglu.models.graph_step import _parallel_reason

    model = Transformer(TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=24, max_seq_len=8), rng=0)
    assert _parallel_reason(DataParallel(model)) is None  # the one-process world records (nothing to record)

    class Mpi(LocalCommunicator):
        capturable = False

    assert "communicator (Mpi) cannot record its reductions" in _parallel_reason(DataParallel(model, Mpi()))

    class StandIn:
        size = 1

    assert "(StandIn) is not a pymglu.distributed.DataParallel" in _parallel_reason(StandIn())
