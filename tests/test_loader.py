"""Config and checkpoint loading: happy path, and errors that name the problem."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmrt.config import ConfigError, ModelConfig
from glmrt.loader import CheckpointError, expected_shapes, load_checkpoint, resolve_model_path


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_config_reads_real_fields(tiny_checkpoint):
    c = ModelConfig.from_pretrained(tiny_checkpoint)
    assert c.text.head_dim == 16 and c.text.hidden_size == 48  # head_dim != hidden / heads
    assert c.text.mrope_section == (2, 3, 3)
    assert c.text.eos_token_ids == (59246, 59253)
    assert c.vision.head_dim == 16 and c.vision.patch_dim == 1176
    assert c.image_token_id == 59280


def test_config_errors_name_the_field(checkpoint_copy):
    data = json.loads((checkpoint_copy / "config.json").read_text())
    bad = dict(data, model_type="llama")
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_dict(bad)
    del data["text_config"]["num_hidden_layers"]
    with pytest.raises(ConfigError, match="text_config.num_hidden_layers"):
        ModelConfig.from_dict(data)


def test_loads_all_tensors_and_keeps_mtp_aside(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint)
    ckpt = load_checkpoint(tiny_checkpoint, config, torch.device("cpu"), torch.bfloat16)
    assert set(ckpt.weights) == set(expected_shapes(config))
    assert all(t.dtype == torch.bfloat16 for t in ckpt.weights.values())
    assert ckpt.mtp_tensor_names and all(n.startswith("model.language_model.layers.2.") for n in ckpt.mtp_tensor_names)


def test_sharded_checkpoint(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    (checkpoint_copy / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, checkpoint_copy / shard)
        weight_map.update({n: shard for n in part})
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = ModelConfig.from_pretrained(checkpoint_copy)
    ckpt = load_checkpoint(checkpoint_copy, config, torch.device("cpu"), torch.float32)
    for name, tensor in ckpt.weights.items():
        assert torch.equal(tensor, weights[name])


def test_missing_unexpected_and_misshaped_reported_together(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["model.visual.blocks.1.attn.qkv.bias"]
    weights["model.visual.extra.weight"] = torch.zeros(3)
    weights["model.language_model.layers.0.self_attn.o_proj.weight"] = torch.zeros(48, 48)
    save_file(weights, checkpoint_copy / "model.safetensors")
    config = ModelConfig.from_pretrained(checkpoint_copy)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(checkpoint_copy, config, torch.device("cpu"), torch.float32)
    msg = str(err.value)
    assert "missing tensor model.visual.blocks.1.attn.qkv.bias" in msg
    assert "unexpected tensor model.visual.extra.weight" in msg
    assert "wrong shape model.language_model.layers.0.self_attn.o_proj.weight: checkpoint [48, 48] != expected [48, 64]" in msg


def test_truncated_file_is_a_clear_error(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    config = ModelConfig.from_pretrained(checkpoint_copy)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(checkpoint_copy, config, torch.device("cpu"), torch.float32)


def test_pickled_weights_are_refused(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    config = ModelConfig.from_pretrained(checkpoint_copy)
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_checkpoint(checkpoint_copy, config, torch.device("cpu"), torch.float32)


def test_model_source_errors(tmp_path, monkeypatch):
    assert resolve_model_path(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="neither a local directory nor a Hub repo id"):
        resolve_model_path(str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not resolve Hub model 'nobody/no-such-model'"):
        resolve_model_path("nobody/no-such-model")
