"""Full pushes of a model whose lm_head is tied to the embeddings (the tiny model's default).

``model.state_dict()`` of a tied model names one storage twice (``model.embed_tokens.weight``
and ``lm_head.weight``). The checkpoint vLLM reloads must hold the embedding only, as
``save_pretrained`` writes it; the server-side re-pack (vllm_ext) does the rest, and
tests/integration/test_serving.py checks the served logprobs after such pushes.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tracetrain.trainer import model_init  # noqa: E402
from tracetrain.trainer.weight_push import PushError, WeightPusher  # noqa: E402


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    return model_init.init_model(tmp_path_factory.mktemp("m") / "tiny")


def _state(model_dir):
    """What the trainer pushes: the live model's state dict (a tied head appears under both names)."""
    from transformers import AutoModelForCausalLM
    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict().items()}


def _write(state, model_dir, tmp_path):
    """Write ``state`` as the pusher writes a full push (no server needed); return (pusher, folder)."""
    pusher = WeightPusher("http://127.0.0.1:9", str(tmp_path / "state.json"), str(tmp_path / "push"),
                          base_model_dir=str(model_dir))
    dest = tmp_path / "v1"
    dest.mkdir()
    pusher._write_full(state, dest)
    return pusher, dest


def test_tied_alias_is_left_out_and_the_checkpoint_validates(tied_model, tmp_path):
    from safetensors import safe_open
    state = _state(tied_model)
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    pusher, dest = _write(state, tied_model, tmp_path)
    with safe_open(str(dest / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
        assert torch.equal(st.get_tensor("model.embed_tokens.weight"), state["model.embed_tokens.weight"])
    assert "lm_head.weight" not in keys and keys == set(state) - {"lm_head.weight"}
    pusher.validate_full(dest)  # same names and shapes as the served checkpoint


def test_wrong_shapes_are_still_refused(tied_model, tmp_path):
    state = _state(tied_model)
    state["model.norm.weight"] = torch.ones(7)
    pusher, dest = _write(state, tied_model, tmp_path)
    with pytest.raises(PushError, match="model.norm.weight"):
        pusher.validate_full(dest)
