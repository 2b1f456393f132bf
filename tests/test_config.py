"""models.yaml validation: good files load, bad ones name the field and the fix."""
import pytest

from hybridserve.config import ConfigError, load_config, parse_config

GOOD = {"backends": [{"name": "t", "arch": "transformer", "checkpoint": "builtin:tiny-transformer",
                      "price_per_hour": 1.0}]}


def _with(**kw):
    backend = {**GOOD["backends"][0], **kw}
    return {"backends": [backend]}


def test_repo_models_yaml_loads_both_profiles():
    cfg = load_config("models.yaml")
    assert {b.arch for b in cfg.backends} == {"transformer", "hybrid"}
    first = cfg.backends[0]   # the real model comes first; the random pair stays, tier economy
    assert (first.name, first.checkpoint, first.tier, first.max_context) == (
        "smollm2-135m", "builtin:smollm2-135m-instruct", "standard", 8192)
    small = [b for b in cfg.backends if b.checkpoint.startswith("builtin:small-")]
    assert len(small) == 2 and {b.tier for b in small} == {"economy"}
    assert {b.engine for b in load_config("models.yaml", "gpu").backends} == {"vllm"}


@pytest.mark.parametrize("bad, field, hint", [
    (_with(dtype="fp64"), "backends[0].dtype", "float32"),
    (_with(arch="moe"), "backends[0].arch", "transformer"),
    (_with(price_per_hour=-1), "backends[0].price_per_hour", "greater than or equal"),
    (_with(checkpoint="builtin:huge"), "backends[0]", "tiny-transformer"),
    (_with(checkpoint="/no/such/dir"), "backends[0]", "existing directory"),
    (_with(engine="remote"), "backends[0]", "url"),
    (_with(device="tpu"), "backends[0].device", "cuda"),
    (_with(colour="blue"), "backends[0].colour", "unknown field"),
    ({"backends": [GOOD["backends"][0], GOOD["backends"][0]]}, "(top level)", "unique"),
    ({"backends": []}, "backends", "at least 1"),
    ({**GOOD, "aliases": {"fast": ["nope"]}}, "(top level)", "unknown backends"),
    ({**GOOD, "gateway": {"state_url": "postgres://db/x"}}, "gateway.state_url", "redis://HOST:6379/0"),
    (_with(host="http://node:8001"), "backends[0].host", "without scheme or port"),
    (_with(engine="remote", url="http://x:1", host="x"), "backends[0]", "remove `host`"),
    ({**GOOD, "gateway": {"state_timeout_s": 0}}, "gateway.state_timeout_s", "greater than 0"),
])
def test_bad_config_names_field_and_fix(bad, field, hint):
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    msg = str(err.value)
    assert field in msg and hint in msg, msg


def test_hub_id_only_valid_for_vllm_and_needs_no_network():
    parse_config(_with(engine="vllm", checkpoint="ibm-granite/granite-4.0-h-1b"))
    with pytest.raises(ConfigError):
        parse_config(_with(engine="native", checkpoint="ibm-granite/granite-4.0-h-1b"))


def test_yaml_errors_are_reported(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("backends: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def _gguf_backend(path, engine="native"):
    return _with(checkpoint=str(path), engine=engine)


def test_gguf_checkpoint_of_a_native_architecture_validates(tmp_path):
    from tests.models.gguf_fixtures import write_metadata_only_gguf

    path = write_metadata_only_gguf(tmp_path / "m.gguf", "llama")
    assert parse_config(_gguf_backend(path)).backends[0].checkpoint == str(path)


@pytest.mark.parametrize("name, arch, engine, hint", [
    ("missing.gguf", None, "native", "does not exist"),
    ("qwen.gguf", "qwen2", "native", "GGUF architecture 'qwen2' is not served by the native engine"),
    ("qwen.gguf", "qwen2", "native", "set `engine: vllm`"),
    ("weights.bin", "llama", "native", "not a .gguf file"),
    ("junk.gguf", "junk", "native", "not a GGUF file"),
    ("missing.gguf", None, "vllm", "does not exist"),
])
def test_bad_gguf_checkpoint_names_the_problem(tmp_path, name, arch, engine, hint):
    from tests.models.gguf_fixtures import write_metadata_only_gguf

    path = tmp_path / name
    if arch == "junk":
        path.write_bytes(b"not gguf")
    elif arch is not None:
        write_metadata_only_gguf(path, arch)
    with pytest.raises(ConfigError) as err:
        parse_config(_gguf_backend(path, engine))
    msg = str(err.value)
    assert "backends[0]" in msg and hint in msg, msg


def test_gguf_of_other_architectures_is_fine_for_vllm(tmp_path):
    from tests.models.gguf_fixtures import write_metadata_only_gguf

    path = write_metadata_only_gguf(tmp_path / "qwen.gguf", "qwen2")
    assert parse_config(_gguf_backend(path, "vllm")).backends[0].engine == "vllm"


def test_packaged_builtin_validates_and_unknown_builtins_list_it():
    parse_config(_with(checkpoint="builtin:smollm2-135m-instruct"))
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        parse_config(_with(checkpoint="builtin:huge"))
