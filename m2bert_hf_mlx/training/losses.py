"""The training objectives; each returns (sum of per-example or per-token losses, number of correct predictions)."""

import mlx.core as mx
import mlx.nn as nn

from ..activations import l2_normalize


def masked_lm_loss_sum(model, batch):
    """Cross-entropy summed over the masked positions (each weighted by `batch["weights"]`: 1, or 0 for padding).
    The prediction head (transform and tied decoder) runs on those positions only, which is the model's own loss
    at a fraction of the cost of the full vocabulary logits."""
    hidden = model.bert(batch["input_ids"]).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["positions"]]
    logits = model.cls.predictions(hidden, model.bert.embeddings.word_embeddings).astype(mx.float32)
    weights = batch["weights"]
    loss = (nn.losses.cross_entropy(logits, batch["targets"]) * weights).sum()
    return loss, ((logits.argmax(axis=-1) == batch["targets"]) * weights).sum()


def classification_loss_sum(model, batch):
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], labels=batch["labels"])
    n = batch["labels"].shape[0]
    correct = (out.logits.argmax(axis=-1) == batch["labels"]).sum() if model.num_labels > 1 else mx.array(0)
    return out.loss * n, correct


def contrastive_loss_sum(model, batch, temperature, group=None):
    """In-batch InfoNCE on the cosine similarity of the pooled embeddings: each query against every passage of the
    micro-batch, its own positive being the right answer.

    With a `group` of several ranks, each holding a slice of the micro-batch, every rank gathers all the queries and
    passages and computes the loss of the whole micro-batch, so the other ranks' passages are negatives too.
    `all_gather` passes back to a rank the gradient of its own slice only, so the ranks' gradients sum to the
    whole micro-batch's; the value returned is a 1/size share, so that the ranks' values sum to the loss too."""
    pooled = model(batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.astype(mx.float32)
    pooled = l2_normalize(pooled)
    queries, passages = mx.split(pooled, 2)
    size = 1 if group is None else group.size()
    if size > 1:
        queries = mx.distributed.all_gather(queries, group=group)
        passages = mx.distributed.all_gather(passages, group=group)
    scores = queries @ passages.T / temperature
    targets = mx.arange(scores.shape[0])
    loss = nn.losses.cross_entropy(scores, targets, reduction="sum")
    correct = (scores.argmax(axis=-1) == targets).sum()
    if size > 1:
        loss = loss - mx.stop_gradient(loss) * (size - 1) / size
        correct = correct / size
    return loss, correct
