import json
import os
import stat

import pytest
import torch

from pipeline.core.models import (
    FAMILIES,
    ModelNotAvailableError,
    UnsupportedModelError,
    family_for,
    identity_of,
    load_model,
    wrap,
)
from pipeline.core.tokens import encode
from tests.conftest import CACHE, TINY, model_spec, tiny_model


@pytest.mark.parametrize("name", TINY)
def test_registry_paths_resolve_with_right_shapes(name):
    lm = tiny_model(name)
    config = lm.model.config
    hidden = config.hidden_size
    assert lm.n_layers == 4
    assert lm.module("embed").weight.shape[1] == hidden
    for layer in range(lm.n_layers):
        for kind in ("block", "mlp", "mlp_out", "attn"):
            assert isinstance(lm.module(kind, layer), torch.nn.Module)
    assert lm.module("final_norm").weight.shape == (hidden,)
    assert lm.module("unembed").weight.shape == (config.vocab_size, hidden)
    # The projection ROME rewrites maps the MLP's inner width back to the residual stream.
    weight = lm.mlp_out_weight(1)
    assert weight.shape[0] == hidden and weight.shape[1] > hidden


@pytest.mark.parametrize("name", TINY)
def test_mlp_out_orientation(name):
    """The (out, in) view computes the projection, whatever the storage (Conv1D or Linear)."""
    lm = tiny_model(name)
    projection = lm.module("mlp_out", 2)
    weight = lm.mlp_out_weight(2)
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    bias = getattr(projection, "bias", None)
    expected = x @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(projection(x), expected)
    assert lm.family.mlp_out_transposed == (name == "tiny-gpt2")


@pytest.mark.parametrize("name", TINY)
def test_mlp_out_feeds_the_block(name):
    """Zeroing the registered projection changes the block's output (it is on the path)."""
    lm = tiny_model(name)
    ids = torch.tensor([encode(lm.tokenizer, "The mother tongue of Danielle Darrieux is")])
    before = lm.model(ids).logits
    with torch.no_grad():
        lm.mlp_out_weight(0).zero_()
    assert not torch.allclose(lm.model(ids).logits, before)


def test_random_models_are_seeded():
    a, b, c = tiny_model("tiny-llama", 0), tiny_model("tiny-llama", 0), tiny_model("tiny-llama", 1)
    assert torch.equal(a.mlp_out_weight(0), b.mlp_out_weight(0))
    assert not torch.equal(a.mlp_out_weight(0), c.mlp_out_weight(0))


def test_unsupported_family_lists_supported():
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama"):
        family_for("bert")
    assert set(FAMILIES) == {"gpt2", "gptj", "gpt_neox", "llama"}
    assert family_for("mistral") is family_for("qwen2") is FAMILIES["llama"]


def test_wrap_uses_model_type():
    lm = tiny_model("tiny-neox")
    assert wrap(lm.model, lm.tokenizer).family.name == "gpt_neox"


def test_missing_hub_model_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = {"name": "x", "source": "hub", "hf_id": "no-such-org/no-such-model"}
    with pytest.raises(ModelNotAvailableError, match="model.path="):
        load_model(spec, cache_dir=tmp_path)


def test_missing_local_model_path_says_so(tmp_path):
    spec = {"name": "x", "source": "hub", "hf_id": "gpt2", "path": str(tmp_path / "absent")}
    with pytest.raises(ModelNotAvailableError, match=r"model.path=.*absent does not exist"):
        load_model(spec, cache_dir=tmp_path)


def test_unreachable_hub_is_one_line_naming_the_cache_and_the_remedy(monkeypatch, tmp_path):
    import transformers

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't "
            "find them in the cached files.\nCheck your internet connection."
        )

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    spec = {"name": "gpt2-xl", "source": "hub", "hf_id": "openai-community/gpt2-xl"}
    with pytest.raises(ModelNotAvailableError) as caught:
        load_model(spec, cache_dir=tmp_path)
    message = str(caught.value)
    assert (
        "\n" not in message and "'openai-community/gpt2-xl' needs the Hugging Face hub" in message
    )
    assert "huggingface" in message.lower() and "model.path=" in message
    assert "couldn't connect" in message  # the cause, its first line


def test_bad_source_and_dtype():
    with pytest.raises(ValueError, match="source"):
        load_model({"source": "ftp"}, cache_dir=CACHE)
    with pytest.raises(ValueError, match="dtype"):
        load_model(model_spec("tiny-gpt2"), cache_dir=CACHE, dtype="int8")


@pytest.mark.slow
def test_embedded_model_loads_from_cache_and_knows_french(smollm2):
    assert (CACHE / "models" / "smollm2-135m" / "model.safetensors").exists()
    assert smollm2.family.name == "llama" and smollm2.n_layers == 30
    ids = torch.tensor([encode(smollm2.tokenizer, "The mother tongue of Danielle Darrieux is")])
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    continuation = smollm2.tokenizer.decode(out[0, ids.shape[1] :])
    assert continuation.startswith(" French"), continuation


def test_identity_names_the_weights_not_the_name():
    a, b = tiny_model("tiny-gpt2", 0), tiny_model("tiny-gpt2", 0)
    c = tiny_model("tiny-gpt2", 1)
    assert a.identity and a.identity == b.identity  # stable across loads
    assert c.name == a.name and c.identity != a.identity  # the seed makes other weights
    handed_in = wrap(a.model, a.tokenizer, "tiny-gpt2")
    assert identity_of(handed_in) == identity_of(wrap(b.model, b.tokenizer))  # by parameters
    assert identity_of(handed_in) != identity_of(wrap(c.model, c.tokenizer))


def test_a_converted_model_must_match_its_source_and_checksums(tmp_path):
    from pipeline.core.gguf import _converted_problem, checksums

    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    source = {"files": [["/pkg/m.gguf", 10, 1]]}
    assert _converted_problem(target, source) == "not converted yet"
    (target / "SOURCE.json").write_text(json.dumps({"source": source}))  # an old conversion
    assert "before checksums" in _converted_problem(target, source)
    (target / "SOURCE.json").write_text(json.dumps({"source": source, "sha256": checksums(target)}))
    assert _converted_problem(target, source) is None
    assert "another file" in _converted_problem(target, {"files": [["/pkg/m.gguf", 10, 2]]})
    data = bytearray((target / "model.safetensors").read_bytes())
    data[1000:1064] = bytes(64)  # 64 flipped bytes
    (target / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors fails its checksum" in _converted_problem(target, source)


@pytest.mark.slow
def test_a_damaged_converted_model_is_converted_again(tmp_path):
    """64 flipped bytes used to load silently (SmolLM2 then answered "unicip", not " French").
    The conversion's files follow the umask (safetensors alone writes the weights 0600)."""
    spec = model_spec("smollm2-135m")
    cache = tmp_path / "cache"
    old = os.umask(0o002)
    try:
        load_model(spec, cache_dir=cache)
    finally:
        os.umask(old)
    converted = [p for p in (cache / "models/smollm2-135m").rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in converted} == {0o664}
    weights = cache / "models/smollm2-135m/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[:64])
    weights.write_bytes(bytes(data))
    lm = load_model(spec, cache_dir=cache)
    ids = torch.tensor([encode(lm.tokenizer, "The mother tongue of Danielle Darrieux is")])
    out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert lm.tokenizer.decode(out[0, ids.shape[1] :]).startswith(" French")
    assert weights.read_bytes() != bytes(data)  # rewritten


def test_a_new_bundled_sample_does_not_change_the_random_models_tokenizer(tmp_path, monkeypatch):
    """The tokenizer learns from named samples only: a sample added to data/samples/ for another
    purpose had changed every tiny model's tokens and so the numbers of the tests on them."""
    import shutil

    from pipeline.core import random_models

    before = random_models._training_text()
    samples = tmp_path / "samples"
    shutil.copytree(random_models.BUNDLED_TEXT, samples)
    (samples / "another_sample.json").write_text('[{"prompt": "zebra quokka axolotl"}]')
    monkeypatch.setattr(random_models, "BUNDLED_TEXT", samples)
    assert random_models._training_text() == before
