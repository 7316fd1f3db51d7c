"""The zoo's checkpoints: the shipped one is whole and current, others build on first use, damage is named."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from lorabench.models import zoo
from lorabench.errors import ModelError


def test_the_shipped_checkpoints_match_their_manifest():
    manifest = zoo.shipped_manifest()
    assert "tiny-llama" in manifest, "the default model's checkpoint is not shipped: run scripts/build-zoo"
    for name, entry in manifest.items():
        assert entry["recipe_key"] == zoo.ZOO[name].recipe_key(), (
            f"{name}'s recipe changed since its checkpoint was shipped: run scripts/build-zoo {name}")
        assert zoo.file_digests(zoo.SHIPPED_DIR / name) == entry["files"], f"shipped {name} differs from manifest.json"


def test_the_default_model_needs_no_build_on_a_cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    assert zoo.is_cached("tiny-llama")
    assert zoo.checkpoint_dir("tiny-llama") == zoo.SHIPPED_DIR / "tiny-llama"
    assert not any(tmp_path.iterdir()), "the shipped checkpoint must be read in place, nothing built or copied"


def test_a_shipped_checkpoint_of_another_recipe_is_not_used(quick_zoo):
    """quick_zoo changes every recipe, so tiny-llama is built into the (empty) cache instead."""
    assert zoo.shipped_dir("tiny-llama") is None and not zoo.is_cached("tiny-llama")
    built = zoo.checkpoint_dir("tiny-llama")
    assert built.parent == zoo.cache_root() / "zoo" and zoo.is_cached("tiny-llama")
    assert (built / "model.safetensors").is_file() and (built / "tokenizer.json").is_file()


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json"])
def test_a_truncated_cache_entry_names_its_folder_and_deleting_it_rebuilds_it(file, quick_zoo):
    built = zoo.checkpoint_dir("tiny-gpt2")
    whole = (built / file).read_bytes()
    (built / file).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError, match=f"{file}.*delete {built} and the next run rebuilds it") as refused:
        zoo.checkpoint_dir("tiny-gpt2")
    assert str(built) in str(refused.value) and "tiny-gpt2" in str(refused.value)
    shutil.rmtree(built)
    assert zoo.checkpoint_dir("tiny-gpt2") == built and (built / file).read_bytes() == whole


def test_a_damaged_shipped_checkpoint_says_to_reinstall(tmp_path, monkeypatch):
    shipped = tmp_path / "zoo_checkpoints"
    shutil.copytree(zoo.SHIPPED_DIR, shipped)
    monkeypatch.setattr(zoo, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(zoo, "SHIPPED_MANIFEST", shipped / "manifest.json")
    (shipped / "tiny-llama" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ModelError, match=r"tokenizer.json is not whole JSON.*reinstall lorabench.*scripts/build-zoo"):
        zoo.checkpoint_dir("tiny-llama")


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(zoo.shipped_manifest()))
def test_a_rebuild_gives_the_shipped_bytes(name, tmp_path):
    """scripts/build-zoo is reproducible: the full pre-training again gives every shipped byte (about a minute)."""
    built_with = zoo.shipped_manifest()[name]["built_with"]
    here = {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if any(built_with[k] != v for k, v in here.items()):
        pytest.skip(f"{name} was shipped from {built_with}; bit-identical floats are promised only on the same "
                    f"libraries and CPU kernels, and this machine has {here}")
    zoo.build(zoo.ZOO[name], tmp_path)
    assert zoo.file_digests(tmp_path) == zoo.shipped_manifest()[name]["files"]
