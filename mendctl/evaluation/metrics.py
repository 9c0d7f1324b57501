"""Quality metrics of the MetaICL protocol, and how far MEND's predictions are from ICL's.

`macro_f1` follows MetaICL's definition so that numbers stay comparable with MetaICL's and MEND's
papers, quirks included:
- a class that is never predicted gets precision 1.0 (not 0, not undefined). Its recall is then 0,
  so its F1 is 0 all the same: the quirk is kept for fidelity but cannot change a score.
- the average is over the classes that occur among the golds; a label that is predicted but never
  gold is not averaged in (scikit-learn's macro average would add it with F1 0). This one does
  change scores.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch


def _check_pairs(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
    if not a:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    _check_pairs(predictions, golds)
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def macro_f1(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Mean over the classes present in `golds` of F1(precision, recall), MetaICL's way.

    recall(c)    = mean correctness over examples whose gold is c
    precision(c) = mean correctness over examples predicted as c; 1.0 when c is never predicted
    F1(c)        = 0 when precision + recall = 0
    """
    _check_pairs(predictions, golds)
    by_gold, by_pred = defaultdict(list), defaultdict(list)
    for p, g in zip(predictions, golds):
        by_gold[g].append(p == g)
        by_pred[p].append(p == g)
    f1s = []
    for label, hits in by_gold.items():
        recall = sum(hits) / len(hits)
        predicted = by_pred.get(label)
        precision = sum(predicted) / len(predicted) if predicted else 1.0
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1s) / len(f1s)


def agreement(preds_a: Sequence[Hashable], preds_b: Sequence[Hashable]) -> float:
    """Fraction of queries on which two methods predict the same option."""
    return accuracy(preds_a, preds_b)


def option_log_probs(losses: Sequence[float]) -> torch.Tensor:
    """log softmax(-loss) over one query's options: a lower loss is a more likely option."""
    return torch.log_softmax(-torch.as_tensor(losses, dtype=torch.float64), dim=0)


def mean_kl(losses_p: Sequence[Sequence[float]], losses_q: Sequence[Sequence[float]]) -> float:
    """Mean over queries of KL(p || q) between option distributions (p = ICL, q = MEND by convention)."""
    _check_pairs(losses_p, losses_q)
    total = 0.0
    for lp, lq in zip(losses_p, losses_q):
        if len(lp) != len(lq):
            raise ValueError(f"a query has {len(lp)} option losses on one side and {len(lq)} on the other")
        log_p, log_q = option_log_probs(lp), option_log_probs(lq)
        total += float((log_p.exp() * (log_p - log_q)).sum())
    return total / len(losses_p)
