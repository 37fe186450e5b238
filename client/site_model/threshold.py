"""A site's own decision threshold for its final binary model, chosen on the same validation split as the model.

Why here and not at the server: the threshold is a statistic of the site's records (where its scores of
positives and negatives fall), which no DP covers; it stays with the final model in the site's folder, like
the model itself. It is chosen once the final model is (client/site_model/final.py chooses; this module only reads
its choice and the validation split it used), by the run's rule `personal.threshold`
(common/model/threshold.py): highest balanced accuracy, or lowest cost for a stated cost ratio.

The validation records were held out of the candidates' fitting when the final model was chosen, but the
chosen candidate is then refitted on the whole training split, them included (the global model excepted,
which never trains here). The threshold is one number on the positive class's probability, and those records
move it little; the site's test split, which nothing here touches, is where the report scores it.
"""

from __future__ import annotations

import torch
from fedtransfer.client.site_model.final import validation_split
from fedtransfer.common.config.finetune import threshold_rule
from fedtransfer.common.model.threshold import ARGMAX, POSITIVE, Threshold, best_threshold
from torch import nn


def site_threshold(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, rule_text: str, seed: int, num_classes: int
) -> Threshold | None:
    """The final model's threshold on the validation split of (x, y) carved with `seed`; None unless binary.

    `seed` must be the one the final model was chosen with (Tuning.seed), so that the split is the same.
    """
    if num_classes != 2:
        return None
    rule = threshold_rule(rule_text)
    _, val = validation_split(y.long().cpu(), seed)
    truth = y.long().cpu()[val].numpy()
    positives = int((truth == POSITIVE).sum())
    where = f"the validation split of the training split ({len(val)} records, {positives} positive)"
    if len(val) == 0:
        return Threshold(ARGMAX, str(rule), "argmax: too few training records to hold any out for validation", 0)
    model.eval()
    with torch.no_grad():
        probs = model(x.float().cpu()[val]).softmax(1)[:, POSITIVE].double().numpy()
    value = best_threshold(probs, truth, rule)
    if value is None:
        return Threshold(ARGMAX, str(rule), f"argmax: {where} holds one class only", len(val))
    return Threshold(value, str(rule), where, len(val))
