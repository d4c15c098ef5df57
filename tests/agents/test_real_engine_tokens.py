"""Token exactness with the real embedded engine: the trainer's ids are the concatenation of the ids
``TransformersEngine`` sampled and the appended messages' ids, turn by turn (the vLLM suite checks VLLMEngine)."""

from agent_exactness import CALCULATOR, check_concatenation, likely_eos, recorded_rollout

from gspo_lightning.engines import TransformersEngine
from gspo_lightning.models import load_causal_lm, resolve_pretrained


def test_the_trainer_gets_the_transformers_engines_ids_turn_by_turn():
    path = str(resolve_pretrained(CALCULATOR))
    model = likely_eos(load_causal_lm(path))
    dm, batch, calls = recorded_rollout(path, model, TransformersEngine())
    assert len(calls) >= 2 and check_concatenation(dm, batch, calls) > 0
