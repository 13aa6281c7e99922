import torch
from torch.optim import Optimizer

Gradients = dict[torch.Tensor, torch.Tensor]


def _accumulate(state: dict, key: str, direction: torch.Tensor, momentum: float) -> torch.Tensor:
    """Heavy-ball buffer (no dampening): the direction itself on the buffer's first step."""
    if key not in state:
        state[key] = direction.detach().clone()
    else:
        state[key].mul_(momentum).add_(direction)
    return state[key]


class DOT(Optimizer):
    """Distillation-oriented trainer (Zhao, Cui, Song & Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023,
    arXiv:2307.08436; reference code: megvii-research/mdistiller, mdistiller/engine/dot.py).

    SGD with a momentum buffer for the task loss's gradient and another for the distillation loss's, the
    distillation one heavier: m_task = momentum - delta, m_kd = momentum + delta. For each parameter p, per step:
        task buffer, if p has a task gradient g:   b_task <- m_task * b_task + (g + weight_decay * p)
        kd buffer, if p has a distillation gradient h:   b_kd <- m_kd * b_kd + h
        p <- p - lr * b_task - lr * b_kd
    A buffer starts as its first direction. Weight decay enters the task buffer only. As in the authors' code,
    a parameter that receives only one of the two gradients in a step uses `momentum` (the mean of m_task and
    m_kd) for that buffer, and one that receives only the distillation gradient takes its weight decay there
    (h + weight_decay * p, from the buffer's second step on).
    `step_parts(task_loss, distillation_loss)` does both backward passes (distillation first, keeping the
    graph); a plain `backward()` + `step()` treats the whole gradient as task gradient: SGD with `momentum`.
    """

    def __init__(self, params, lr: float, momentum: float, delta: float, weight_decay: float):
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"DOT: lr={lr} must be > 0 and weight_decay={weight_decay} >= 0")
        if not 0 <= momentum - delta <= momentum + delta < 1:
            raise ValueError(f"DOT: momentum={momentum} and delta={delta} need delta >= 0, 0 <= momentum - delta "
                             f"and momentum + delta < 1 (the authors: momentum 0.9, delta 0.075)")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))

    def _gradients(self, loss: torch.Tensor, retain_graph: bool = False) -> Gradients:
        self.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward(retain_graph=retain_graph)
        return {p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None}

    def step_parts(self, task_loss: torch.Tensor, distillation_loss: torch.Tensor) -> None:
        distillation = self._gradients(distillation_loss, retain_graph=True)
        task = self._gradients(task_loss)
        self._update(task, distillation)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update({p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None}, {})
        return loss

    @torch.no_grad()
    def _update(self, task: Gradients, distillation: Gradients) -> None:
        for group in self.param_groups:
            lr, momentum, delta, decay = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                g, h = task.get(p), distillation.get(p)
                if g is None and h is None:
                    continue
                both, state = g is not None and h is not None, self.state[p]
                if g is not None:
                    buffer = _accumulate(state, "momentum_buffer", g.add(p, alpha=decay),
                                         momentum - delta if both else momentum)
                    p.add_(buffer, alpha=-lr)
                if h is not None:
                    kd_only_after_first = not both and "momentum_kd_buffer" in state
                    direction = h.add(p, alpha=decay) if kd_only_after_first else h
                    buffer = _accumulate(state, "momentum_kd_buffer", direction, momentum + delta if both else momentum)
                    p.add_(buffer, alpha=-lr)
