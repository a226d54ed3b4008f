"""Loading errors that name what is wrong: an unusable device (not a "corrupt" file),
weights stored as integers or bools (not silently cast), a sparsity vector that belongs
to another SAE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsae
from fastsae.saes import TopKTrainingSAE
from fastsae.training import TopKTrainingSAEConfig

D_IN, D_SAE = 8, 32


@pytest.fixture
def saved(tmp_path):
    sae = fastsae.SAE.from_dict({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 4})
    folder = tmp_path / "repo" / "sae"
    sae.save_model(folder)
    return sae, folder


def test_an_unavailable_cuda_device_is_named_not_called_a_corrupt_file(saved):
    _, folder = saved
    if torch.cuda.is_available():
        device, expected = f"cuda:{torch.cuda.device_count()}", "CUDA device"
    else:
        device, expected = "cuda", "CUDA is not available"
    with pytest.raises(RuntimeError, match=expected) as e:
        fastsae.SAE.load_from_disk(folder, device=device)
    assert repr(device) in str(e.value)
    assert "corrupt" not in str(e.value)
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        fastsae.SAE.load_from_disk(folder, device="gpu0")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.uint8])
def test_integer_or_bool_weights_are_an_error_naming_file_and_tensor(saved, dtype):
    _, folder = saved
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_enc"] = tensors["W_enc"].to(dtype)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="tensor 'W_enc' has dtype") as e:
        fastsae.SAE.load_from_disk(folder)
    assert str(weights) in str(e.value)
    # the training classes read checkpoints through the same reader
    training = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with pytest.raises(ValueError, match=f"{weights}: tensor 'W_enc'"):
        training.load_weights_from_checkpoint(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_weights_load_cast_to_the_configs_dtype(saved, dtype):
    sae, folder = saved
    weights = folder / "sae_weights.safetensors"
    tensors = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    loaded = fastsae.SAE.load_from_disk(folder)
    for name, tensor in tensors.items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_a_sparsity_vector_of_another_length_is_an_error_naming_the_file(saved):
    sae, folder = saved
    save_file({"sparsity": torch.zeros(D_SAE // 2)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(ValueError, match=r"sparsity has shape \[16\].*d_sae=32") as e:
        fastsae.SAE.from_pretrained_with_cfg_and_sparsity(str(folder.parent), "sae")
    assert str(folder / "sparsity.safetensors") in str(e.value)
