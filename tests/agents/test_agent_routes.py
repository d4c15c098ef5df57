"""Routes of multi-turn trajectories: each position's from the first engine call that ran it, laid out in columns."""

import torch
from scripted import LAYERS, TOP_K, ScriptedEngine, call_text, chat_tokenizer, prompts, route_value, tool_runner, turn

from gspo_lightning.agents.trajectory import Trajectory, trajectories_to_generation


def _model_runs(mask):
    out, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def expected_routes(t):
    """(positions,) call index that first ran each position (-1: none): turn k runs in call k, and its forward covers
    its whole context (prefill) and every sampled token but the last (never fed back)."""
    first = torch.full((len(t.prompt_ids) + len(t.completion_ids),), -1, dtype=torch.long)
    for k, (start, length) in enumerate(_model_runs(t.loss_mask)):
        covered = len(t.prompt_ids) + start + length - 1
        fresh = (first[:covered] == -1).nonzero().flatten()
        first[fresh] = k
    return first


def test_each_position_routes_from_the_first_call_that_ran_it_and_the_layout():
    tok = chat_tokenizer()
    call_once = turn(tok, call_text("add", a=1, b=2))
    call_twice = turn(tok, call_text("add", a=2, b=2))

    def script(call, context, sample):
        if sample == 1 or call >= 2:
            return turn(tok, "done" if call else "4")
        return call_once if sample == 0 and call == 0 else call_twice

    engine = ScriptedEngine(tok, script, routes=True)
    runner = tool_runner(engine)
    ps = prompts(tok, ["1+2", "20+22"], runner.renderer.tools)
    gen = runner.run(ps, 2)
    trajs = gen.trajectories
    assert [t.turns for t in trajs] == [3, 1, 3, 1] and len(engine.calls) == 3

    for t in trajs:
        width = len(t.prompt_ids) + len(t.completion_ids)
        first = expected_routes(t)
        assert t.routes.shape == (LAYERS, width, TOP_K) and t.route_mask.shape == (width,)
        assert torch.equal(t.route_mask, first >= 0)
        # appended tool tokens (and the previous turn's last token) came from the next turn's prefill
        tool_positions = [len(t.prompt_ids) + q for q, m in enumerate(t.loss_mask) if not m]
        if tool_positions:
            assert (first[tool_positions] >= 1).all()
        assert not t.route_mask[-1]  # the final sampled token was never run
        for q in range(width):
            if first[q] >= 0:
                assert (t.routes[:, q] == route_value(int(first[q]), q)).all(), q

    # trajectories_to_generation: [prompt | response] columns, left-padded prompts, right-padded responses
    p, w = gen.prompt_ids.shape[1], gen.response_ids.shape[1]
    assert gen.routes.shape == (4, LAYERS, p + w, TOP_K) and gen.route_mask.shape == (4, p + w)
    for i, t in enumerate(trajs):
        a, b = len(t.prompt_ids), len(t.completion_ids)
        assert torch.equal(gen.routes[i, :, p - a : p + b], t.routes[:, : a + b])
        assert torch.equal(gen.route_mask[i, p - a : p + b], t.route_mask[: a + b])
        assert not gen.route_mask[i, : p - a].any() and not gen.route_mask[i, p + b :].any()
        assert gen.prompt_ids[i, p - a :].tolist() == t.prompt_ids
    # the mask's known columns are real tokens only
    real = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    assert not (gen.route_mask & ~real).any()


def test_layout_routes_of_hand_built_trajectories():
    r1 = torch.arange(2 * 5 * 1).view(2, 5, 1)
    r2 = 100 + torch.arange(2 * 4 * 1).view(2, 4, 1)
    t1 = Trajectory([1, 2], [3, 4, 5], [True, False, True], routes=r1, route_mask=torch.tensor([1, 1, 1, 1, 0]).bool())
    t2 = Trajectory([1, 2, 3], [4], [True], routes=r2, route_mask=None)
    gen = trajectories_to_generation([t1, t2], pad_id=0)
    assert gen.prompt_ids.tolist() == [[0, 1, 2], [1, 2, 3]] and gen.response_ids.tolist() == [[3, 4, 5], [4, 0, 0]]
    assert torch.equal(gen.routes[0, :, 1:], r1) and (gen.routes[0, :, 0] == 0).all()
    assert torch.equal(gen.routes[1, :, :4], r2) and (gen.routes[1, :, 4:] == 0).all()
    assert gen.route_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    # routes only when every trajectory has them
    assert trajectories_to_generation([t1, Trajectory([1], [2], [True])], 0).routes is None
