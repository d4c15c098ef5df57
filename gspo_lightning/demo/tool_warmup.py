"""The agent demo's supervised warm-up: traces built token by token exactly as the agent loop builds trajectories.

Each trace is a prompt of :class:`~gspo_lightning.data.tasks.MultiplicationTask` rendered with the ``multiply``
tool declared, then either (a share ``tool_use_rate``) a tool call, the tool's result appended through the chat
template (:class:`~gspo_lightning.data.chat.MessageRenderer`) and the answer copied from it, or a direct answer
(which the model can only guess). Cross-entropy is taken on the model's tokens only, as RL later trains them.
So the model starts RL knowing how to call the tool but rarely choosing to: greedy decoding answers directly.
"""

from __future__ import annotations

import json
import random

import torch

from gspo_lightning.data.chat import MessageRenderer
from gspo_lightning.data.encode import encode_prompts
from gspo_lightning.data.tasks import MultiplicationTask
from gspo_lightning.demo.tools import multiply


def tool_traces(tokenizer, n: int, tool_use_rate: float, seed: int) -> list[tuple[list[int], list[bool]]]:
    """``n`` warm-up traces: (ids, mask of the model's tokens) each."""
    from transformers.utils import get_json_schema

    schemas = [get_json_schema(multiply)]  # as data.tools declares it
    task = MultiplicationTask(seed=seed)
    rng = random.Random(f"tool-traces-{seed}")
    records = rng.choices(task.train(), k=n)
    prompts, _ = encode_prompts(records, tokenizer, max_prompt_length=10_000, tools=schemas)
    renderer = MessageRenderer(tokenizer, schemas)
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    traces = []
    for p in prompts:
        a, b = (int(x) for x in p.record.text.split("*"))
        answer = [*encode(f" {a * b}"), eos]
        ids, mask = list(p.input_ids), [False] * len(p.input_ids)
        if rng.random() < tool_use_rate:
            call = json.dumps({"name": "multiply", "arguments": {"a": a, "b": b}}, separators=(",", ":"))
            turn = [*encode(f"<tool_call>{call}</tool_call>"), eos]
            result = renderer.ids([{"role": "tool", "name": "multiply", "content": str(a * b)}])
            ids += turn + result
            mask += [True] * len(turn) + [False] * len(result)
        ids += answer
        mask += [True] * len(answer)
        traces.append((ids, mask))
    return traces


def tool_warmup(model, tokenizer, spec) -> dict[str, float]:
    """Cross-entropy on the model tokens of ``spec.sft_steps x spec.sft_batch_size`` traces (right-padded)."""
    if spec.sft_steps == 0:
        return {"steps": 0, "probe_accuracy": float("nan")}
    traces = tool_traces(tokenizer, spec.sft_steps * spec.sft_batch_size, spec.tool_use_rate, spec.seed)
    width = max(len(ids) for ids, _ in traces)
    ids = torch.full((len(traces), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(traces), width), -100, dtype=torch.long)
    attention = torch.zeros(len(traces), width, dtype=torch.long)
    for i, (seq, mask) in enumerate(traces):
        row = torch.tensor(seq)
        ids[i, : len(seq)], attention[i, : len(seq)] = row, 1
        labels[i, : len(seq)] = row.masked_fill(~torch.tensor(mask), -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / spec.sft_steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(spec.sft_steps):
        rows = slice(step * spec.sft_batch_size, (step + 1) * spec.sft_batch_size)
        used = int(attention[rows].sum(1).max())
        out = model(input_ids=ids[rows, :used], attention_mask=attention[rows, :used], labels=labels[rows, :used])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach()
    model.eval()
    return {"steps": spec.sft_steps, "probe_accuracy": float("nan"), "final_loss": float(loss)}
