"""Helpers shared by the DSB loss tests: the loss cases, parent/DSB pairs with the
same parameters, a numpy model of the FIFO memory, and the checkpoint and
trainer scenarios that every DSB loss goes through."""
import io

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers, trainers

from pml_dsb import (
    DSBArcFaceLoss,
    DSBCosFaceLoss,
    DSBNormalizedSoftmaxLoss,
    DSBSoftTripleLoss,
    with_dsb_weighting,
)

# name -> (DSB class, PML parent class, small constructor kwargs)
CASES = {
    "soft_triple": (DSBSoftTripleLoss, pml_losses.SoftTripleLoss, {"centers_per_class": 3}),
    "norm_softmax": (DSBNormalizedSoftmaxLoss, pml_losses.NormalizedSoftmaxLoss, {}),
    "arcface": (DSBArcFaceLoss, pml_losses.ArcFaceLoss, {}),
    "cosface": (DSBCosFaceLoss, pml_losses.CosFaceLoss, {}),
    "with_dsb_weighting(ArcFaceLoss)": (with_dsb_weighting(pml_losses.ArcFaceLoss), pml_losses.ArcFaceLoss, {}),
    "with_dsb_weighting(NormalizedSoftmaxLoss)": (
        with_dsb_weighting(pml_losses.NormalizedSoftmaxLoss),
        pml_losses.NormalizedSoftmaxLoss,
        {},
    ),
}


def randomize_parameters(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_pair(case, gen, num_classes, embedding_size, memory_size, warmup_epochs, parent_kwargs=None, **dsb_kwargs):
    """(dsb, parent with mean reducer, parent with DoNothingReducer), equal parameters."""
    dsb_cls, parent_cls, kwargs = CASES[case]
    kwargs = {**kwargs, **(parent_kwargs or {})}
    parent = parent_cls(num_classes, embedding_size, **kwargs)
    randomize_parameters(parent, gen)
    element = parent_cls(num_classes, embedding_size, reducer=reducers.DoNothingReducer(), **kwargs)
    element.load_state_dict(parent.state_dict())
    dsb = dsb_cls(
        num_classes, embedding_size, memory_size=memory_size, warmup_epochs=warmup_epochs, **kwargs, **dsb_kwargs
    )
    state = dsb.state_dict()
    assert set(parent.state_dict()) <= set(state)
    state.update(parent.state_dict())
    dsb.load_state_dict(state)  # strict: the DSB loss has exactly the parent's parameters + memory
    return dsb, parent, element


def unit64(emb):
    e = emb.detach().double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


class FifoModel:
    """The latest M (unit embedding, label) pairs, in float64."""

    def __init__(self, memory_size):
        self.memory_size = memory_size
        self.emb = np.zeros((0, 0))
        self.labels = np.zeros(0, dtype=np.int64)
        self.enqueued = 0

    def extend(self, emb, labels):
        e = unit64(emb)
        self.emb = (np.concatenate([self.emb, e]) if self.emb.size else e)[-self.memory_size :]
        self.labels = np.concatenate([self.labels, labels.numpy()])[-self.memory_size :]
        self.enqueued += len(labels)

    def stage(self, warmup_epochs):
        if self.enqueued < self.memory_size:
            return 1
        return 2 if self.enqueued < warmup_epochs * self.memory_size else 3

    def scales(self, np_ref, num_classes):
        return np_ref.class_scales(self.emb, self.labels, num_classes)

    def weights(self, np_ref, num_classes, normalize="mean"):
        counts = np.bincount(self.labels, minlength=num_classes)
        return np_ref.dsb_weights(self.scales(np_ref, num_classes), counts, normalize)


def leaf(emb):
    return emb.detach().clone().requires_grad_()


def param_grads(module):
    return [p.grad.clone() for p in module.parameters()]


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


# ------------------------------------------------------------ checkpointing
def _build(case, gen, C, d, M, n):
    dsb_cls, _, kwargs = CASES[case]
    model = torch.nn.Linear(6, d)
    loss = dsb_cls(C, d, memory_size=M, warmup_epochs=n, **kwargs)
    randomize_parameters(model, gen)
    randomize_parameters(loss, gen)
    opt = torch.optim.Adam(list(model.parameters()) + list(loss.parameters()), lr=1e-2)
    return model, loss, opt


def _step(model, loss, opt, x, y):
    opt.zero_grad()
    out = loss(model(x), y)
    out.backward()
    opt.step()
    return out.detach()


def checkpoint_resume(case, gen, resume_at=6, after=50):
    """Train ``resume_at + after`` iterations, checkpoint after ``resume_at``
    (stage 2), resume in fresh objects. Returns the uninterrupted losses, the
    resumed ones, those resumed without the memory, and the two final losses."""
    C, d, M, n, B = 4, 8, 32, 3, 8
    probs = torch.tensor([0.6, 0.2, 0.15, 0.05])  # class 0 outgrows its initial slot capacity
    xs = torch.randn(resume_at + after, B, 6, generator=gen)
    ys = torch.multinomial(probs, (resume_at + after) * B, replacement=True, generator=gen).view(-1, B)

    model, loss, opt = _build(case, gen, C, d, M, n)
    uninterrupted, stages = [], []
    for i in range(resume_at + after):
        if i == resume_at:
            assert loss.memory.stage == 2
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "loss": loss.state_dict(), "opt": opt.state_dict()}, buf)
        out = _step(model, loss, opt, xs[i], ys[i])
        if i >= resume_at:
            uninterrupted.append(out)
            stages.append(loss.memory.stage)

    def resume(with_memory):
        buf.seek(0)
        ckpt = torch.load(buf)
        m2, l2, o2 = _build(case, torch.Generator().manual_seed(99), C, d, M, n)
        m2.load_state_dict(ckpt["model"])
        if with_memory:
            l2.load_state_dict(ckpt["loss"])
        else:
            l2.load_state_dict({k: v for k, v in ckpt["loss"].items() if not k.startswith("memory.")}, strict=False)
        o2.load_state_dict(ckpt["opt"])
        return [_step(m2, l2, o2, xs[i], ys[i]) for i in range(resume_at, resume_at + after)], l2

    resumed, loss2 = resume(True)
    without_memory, _ = resume(False)
    return uninterrupted, resumed, without_memory, stages, loss, loss2


# ------------------------------------------------------------------ trainer
def run_metric_loss_only(case, gen, iterations=5, batch_size=16, end_of_iteration_hook=None):
    """A few iterations of PML's MetricLossOnly; returns (loss, stages, losses, params before).
    ``end_of_iteration_hook`` (e.g. a PML ``HookContainer``'s) runs after each iteration too."""
    dsb_cls, _, kwargs = CASES[case]
    C, d, M = 4, 8, 32
    x = torch.randn(64, 6, generator=gen)
    y = torch.randint(0, C, (64,), generator=gen)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU())
    embedder = torch.nn.Linear(12, d)
    loss = dsb_cls(C, d, memory_size=M, warmup_epochs=2, **kwargs)
    for m in (trunk, embedder, loss):
        randomize_parameters(m, gen)
    before = [p.detach().clone() for p in loss.parameters()]
    optimizers = {
        "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.01),
        "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.01),
        "metric_loss_optimizer": torch.optim.SGD(loss.parameters(), lr=0.1),
    }
    stages, values = [], []

    def hook(trainer):
        stages.append(loss.dsb_stage)
        values.append(float(trainer.losses["metric_loss"].detach()))
        if end_of_iteration_hook is not None:
            end_of_iteration_hook(trainer)

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(x, y),
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
        iterations_per_epoch=iterations,
        end_of_iteration_hook=hook,
    )
    trainer.train(num_epochs=1)
    return loss, stages, values, before
