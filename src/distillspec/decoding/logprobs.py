"""Log-probabilities of emitted tokens under the target: pure tensor functions.

What is reported is the target's raw distribution, ``log_softmax(logits)`` in float32 at
temperature 1, before temperature, top-k and top-p (what vLLM reports by default): the
distribution the sampled output follows up to that warping, and the one a scoring client
(log-likelihood evaluation) wants. The engine passes the logits of the verify pass that
accepted the tokens (or of the prefill, for a prompt's own tokens), so no extra forward runs.
"""

from __future__ import annotations

import torch

from distillspec.decoding.requests import RowUpdate, TokenLogprobs, _Row


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int):
    """``logits [B, T, V]`` and the tokens taken at each position ``[B, T]`` -> (the tokens'
    log-probabilities ``[B, T]``, the ``top`` largest log-probabilities ``[B, T, top]`` and
    their ids ``[B, T, top]``, most likely first)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tokens = tokens.clamp(0, logp.shape[-1] - 1)  # past the verified prefix: any id, never read
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    best = logp.topk(min(top, logp.shape[-1]), dim=-1)
    return chosen, best.values, best.indices


def host_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int | None],
                  ) -> list[list[TokenLogprobs] | None]:
    """Per row, every position's ``TokenLogprobs`` with that row's own number of alternatives
    (None: the row asked for none, and gets None). One device-to-host transfer."""
    wanted = [i for i, top in enumerate(tops) if top is not None]
    if not wanted:
        return [None] * len(tops)
    index = torch.tensor(wanted, device=logits.device)
    chosen, values, ids = token_logprobs(logits[index], tokens[index],
                                         max(tops[i] for i in wanted))
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    rows: list[list[TokenLogprobs] | None] = [None] * len(tops)
    for slot, row in enumerate(wanted):
        top = tops[row]
        rows[row] = [TokenLogprobs(lp, list(zip(ids[slot][t][:top], values[slot][t][:top])))
                     for t, lp in enumerate(chosen[slot])]
    return rows


def prompt_logprobs(joining: list[_Row], logits: torch.Tensor, pads: list[int],
                    device) -> list[RowUpdate]:
    """Each scoring row's prompt tokens under the target, from the prefill's logits: the
    logits at prefill column pad + i predict prompt token i + 1 (the first has none)."""
    updates = []
    for index, (row, pad) in enumerate(zip(joining, pads)):
        top, prompt = row.request.prompt_logprobs, row.request.prompt_ids
        if top is None:
            continue
        entries: list = [None]
        if len(prompt) > 1:
            taken = torch.tensor([prompt[1:]], device=device)
            entries += host_logprobs(logits[index : index + 1, pad:], taken, [top])[0]
        updates.append(RowUpdate(row.request.request_id, [], False, None,
                                 prompt_logprobs=entries))
    return updates
