"""`loramux serve` settings: a value the engine cannot run is refused at start with the setting
named (flag, LORAMUX_* variable or config-file key), exit status 2, before any model is loaded.
Before, `--max-num-batched-tokens 0` started a server whose requests never finished,
`--max-waiting 0` one that refused every request, `--block-size 0` / `--log-level x` /
`--device x` / `--port 70000` died with a traceback, and a misspelt config-file key was ignored.
Fast: no server (the parser and `main` stop before the engine)."""

from __future__ import annotations

import json

import pytest

from server.cli import build_config, main, make_parser
from server.config import Config


def config_of(*argv: str):
    return build_config(make_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("flag, value", [
    ("max-num-seqs", "0"), ("max-num-batched-tokens", "0"), ("max-num-batched-tokens", "-8"),
    ("block-size", "0"), ("max-model-len", "0"), ("num-threads", "0"), ("max-waiting", "0"),
    ("prefetch-window", "0"), ("max-wait-steps", "-1"), ("max-lora-rank", "0"), ("max-cpu-loras", "0"),
    ("max-loras", "0"), ("adapter-loaders", "0"), ("lora-page-rank", "0"), ("adapter-metric-series", "-1"),
    ("max-mixture-experts", "0"), ("max-mixture-rank", "0"), ("max-route-experts", "0"),
    ("kv-cache-memory", "0"), ("kv-cache-memory", "-1GiB"), ("lora-pool-memory", "0"),
    ("cpu-lora-cache-memory", "0"), ("max-body-bytes", "0"), ("port", "70000"), ("port", "-1"),
    ("log-level", "loud"), ("device", "gpu0"), ("max-num-seqs", "1.5"), ("max-num-seqs", "many"),
    ("dtype", "foo"), ("dtype", "float16"), ("lora-dtype", "int8"), ("lora-dtype", "foo"),
    ("gpu-memory-utilization", "0"), ("gpu-memory-utilization", "1.01"), ("gpu-memory-utilization", "nan"),
    ("gpu-memory-utilization", "-0.5"), ("gpu-memory-utilization", "most"),
])
def test_a_value_the_server_cannot_run_is_refused_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=f"--{flag}"):
        config_of(f"--{flag}={value}")


def test_an_environment_variable_is_named_with_its_value(monkeypatch):
    monkeypatch.setenv("LORAMUX_MAX_NUM_SEQS", "abc")
    with pytest.raises(ValueError, match="LORAMUX_MAX_NUM_SEQS=abc"):
        config_of()


def test_a_config_file_key_is_checked_and_a_misspelt_one_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"block_size": 0}))
    with pytest.raises(ValueError, match="block-size in .*bad.json"):
        config_of("--config", str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text("max_num_seq = 32\n")
    with pytest.raises(ValueError, match="unknown setting.*max-num-seq"):
        config_of("--config", str(typo))


def test_good_values_still_pass():
    cfg = config_of("--max-num-seqs", "1", "--max-num-batched-tokens", "1", "--block-size", "12", "--port", "0",
                    "--device", "cuda:1", "--log-level", "WARNING", "--max-wait-steps", "0",
                    "--adapter-metric-series", "0", "--kv-cache-memory", "512MiB", "--gpu-memory-utilization", "1")
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, cfg.cache.block_size) == (1, 1, 12)
    assert (cfg.server.port, cfg.model.device, cfg.server.log_level) == (0, "cuda:1", "warning")
    assert cfg.cache.kv_cache_memory == 512 << 20 and cfg.lora.adapter_metric_series == 0
    assert cfg.cache.gpu_memory_utilization == 1.0 and config_of().cache.kv_cache_memory is None
    assert config_of("--gpu-memory-utilization", "0.5").cache.gpu_memory_utilization == 0.5
    assert config_of() == Config()
    assert config_of("--dtype", "BFloat16", "--lora-dtype", "float32").model.dtype == "bfloat16"


def test_help_names_every_value_a_choice_takes_and_shows_on_off_defaults_as_such():
    text = " ".join(make_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "debug | info | warning | error | critical" in text and "auto | cpu | cuda | cuda:N" in text
    assert "[default: on; env LORAMUX_ENGINE_PROCESS]" in text


def test_main_exits_2_with_the_reason_before_loading_anything(monkeypatch, capsys):
    monkeypatch.setenv("LORAMUX_MAX_NUM_BATCHED_TOKENS", "0")
    assert main(["serve", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "LORAMUX_MAX_NUM_BATCHED_TOKENS=0" in err and ">= 1" in err


@pytest.mark.parametrize("source", ["toml", "json", "env"])
def test_a_switch_from_a_config_file_or_variable_means_what_its_flag_means(tmp_path, monkeypatch, source):
    """`no_prefix_caching = true` turns prefix caching off, as `--no-prefix-caching` does (before, a
    boolean from a file was stored as is: true turned it on, false turned it off)."""
    for on, expected in ((True, False), (False, True)):
        if source == "env":
            monkeypatch.setenv("LORAMUX_NO_PREFIX_CACHING", "true" if on else "false")
            argv: tuple[str, ...] = ()
        else:
            path = tmp_path / f"c.{source}"
            path.write_text(f"no_prefix_caching = {str(on).lower()}\n" if source == "toml"
                            else json.dumps({"no_prefix_caching": on}))
            argv = ("--config", str(path))
        assert config_of(*argv).cache.prefix_caching is expected, (source, on)
    assert config_of("--no-prefix-caching").cache.prefix_caching is False
    monkeypatch.delenv("LORAMUX_NO_PREFIX_CACHING", raising=False)
    path = tmp_path / "lora.toml"
    path.write_text("no_lora = true\n")
    assert config_of("--config", str(path)).lora.enabled is False


def test_a_switch_variable_that_is_no_boolean_is_refused_naming_it(monkeypatch):
    """LORAMUX_ASYNC_SCHEDULING=ture was taken as off without a word."""
    monkeypatch.setenv("LORAMUX_ASYNC_SCHEDULING", "ture")
    with pytest.raises(ValueError, match="LORAMUX_ASYNC_SCHEDULING=ture"):
        config_of()
    monkeypatch.setenv("LORAMUX_ASYNC_SCHEDULING", "on")
    assert config_of().scheduler.async_scheduling is True
