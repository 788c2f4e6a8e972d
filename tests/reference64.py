"""Float64 references with materialized logits: what every op is checked against."""
import torch


def logprobs64(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Token log-probs and entropies [...] in float64 (0 where ignored), differentiable."""
    z = (hidden.double() @ weight.double().T) / temperature
    logsm = z.log_softmax(dim=-1)
    keep = targets != ignore_index
    lp = logsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero)


def leaves(*tensors):
    """Detached float64 copies that require grad, and detached originals that require grad."""
    return [t.detach().double().requires_grad_() for t in tensors], [t.detach().clone().requires_grad_() for t in tensors]


def rel_err(a, b):
    """max |a - b| / max |b| in float64."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
