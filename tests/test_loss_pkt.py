import numpy as np
import pytest
import torch

from kd.losses.pkt import PKT
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_pkt_against_direct_loops(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)

    def probs(f):
        x = f.numpy().mean((2, 3))
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        rows = []
        for i in range(len(x)):
            sims = np.array([x[i] @ x[j] for j in range(len(x)) if j != i]) / 0.1
            e = np.exp(sims - sims.max())
            rows.append(e / e.sum())
        return np.array(rows)

    ps, pt = probs(fs), probs(ft)
    pkt = np.mean(np.sum(pt * np.log(pt / ps), axis=1))
    total, terms = evaluate(PKT(temperature=0.1, weight=2.0, feature="feat", kernel="softmax"), outputs(zs, feat=fs),
                            outputs(zt, feat=ft), y)
    assert terms["pkt"].item() == pytest.approx(pkt, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 2 * pkt, rel=1e-8)


def test_pkt_is_invariant_to_feature_scale(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)
    loss = PKT(0.1, 2.0, "feat", "softmax")
    _, base = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    _, scaled = evaluate(loss, outputs(zs, feat=7.5 * fs), outputs(zt, feat=0.01 * ft), y)
    for name in ("pkt",):
        assert scaled[name].item() == pytest.approx(base[name].item(), rel=1e-8) and base[name].item() > 0
