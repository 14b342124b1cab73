"""Configuration: keyword arguments > BIGMP_* environment variables > defaults; driver flags."""
from __future__ import annotations

import argparse

import pytest

import bigmp
from bigmp import config


def test_defaults_env_and_arguments_in_that_order(monkeypatch):
    assert config.resolve()["keepalive_lease"] == config.OPTIONS["keepalive_lease"].default
    monkeypatch.setenv("BIGMP_KEEPALIVE_LEASE", "7.5")
    assert config.resolve()["keepalive_lease"] == 7.5
    assert config.resolve(keepalive_lease=3)["keepalive_lease"] == 3


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("BIGMP_KEEPALIVE_LEASE", "soon")
    with pytest.raises(ValueError, match="BIGMP_KEEPALIVE_LEASE"):
        config.resolve()


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="keepalive_leese"):
        config.resolve(keepalive_leese=1)


def test_argparse_helper_round_trip(monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1)
    bigmp.add_arguments(parser)
    args = parser.parse_args(["--samples", "5", "--bigmp-system", "local",
                              "--bigmp-keepalive-lease", "12", "--bigmp-local-mode", "spawn"])
    opts = bigmp.options_from_args(args)
    assert opts == {"system": "local", "keepalive_lease": 12.0, "local_mode": "spawn"}
    assert args.samples == 5
    # Flags not given stay out, so the environment still applies to them.
    monkeypatch.setenv("BIGMP_KEEPALIVE_INTERVAL", "0.5")
    assert config.resolve(**opts)["keepalive_interval"] == 0.5


def test_environment_selects_local_mode(monkeypatch):
    monkeypatch.setenv("BIGMP_LOCAL_MODE", "spawn")
    with bigmp.start() as b:
        assert b.system.mode == "spawn"
    monkeypatch.setenv("BIGMP_LOCAL_MODE", "thread")
    with pytest.raises(ValueError, match="local_mode"):
        bigmp.start()
