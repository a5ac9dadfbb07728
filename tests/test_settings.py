"""The settings of ``facegallery serve`` (server/service/settings.py, cli.py): one object from a TOML
file, FACEGALLERY_* variables and flags, in that order of precedence; clear one-line errors; the
example file in docs/ holds exactly the built-in defaults. No server is started: the command runs
with its ``run_server`` replaced by a recorder."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from facegallery.server.face.batching import DEFAULT_MAX_BATCH_SIZE
from facegallery.server.service import cli
from facegallery.server.service.app import DEFAULT_MAX_WORKERS, DEFAULT_PORT, ServerConfig
from facegallery.server.service.settings import ServeSettings, SettingsError, Source

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "facegallery.example.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No FACEGALLERY_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith("FACEGALLERY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """``invoke(*args, env=None)`` runs ``facegallery serve`` with the server replaced: returns
    (click result, the ServerConfig it would have run or None, the logging it would have set up)."""
    ran: list[ServerConfig] = []
    logging_setup: list[tuple[str, str]] = []
    monkeypatch.setattr(cli, "run_server", ran.append)
    monkeypatch.setattr(cli, "configure_logging", lambda level, fmt: logging_setup.append((level, fmt)))
    default_model = tmp_path / "default-model"
    command = cli.make_serve_command(lambda: default_model)

    def invoke(*args: str, env: dict[str, str] | None = None):
        ran.clear()
        result = CliRunner().invoke(command, list(args), env=env, catch_exceptions=False)
        return result, (ran[0] if ran else None), logging_setup[-1] if logging_setup else None

    invoke.default_model = default_model
    return invoke


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flag_beats_env_beats_file_beats_default(serve, tmp_path):
    config = write(tmp_path / "serve.toml", "port = 6001\nmax_workers = 3\nbatch_size = 7\n")
    env = {"FACEGALLERY_PORT": "6002", "FACEGALLERY_MAX_WORKERS": "4"}

    result, server, _ = serve("--config", str(config), "--port", "6003", env=env)
    assert result.exit_code == 0, result.output
    assert (server.port, server.max_workers, server.batch_max_size) == (6003, 4, 7)  # flag, env, file
    assert server.search_threads == ServerConfig.search_threads  # default

    _, server, _ = serve("--config", str(config), env=env)
    assert (server.port, server.max_workers) == (6002, 4)
    _, server, _ = serve("--config", str(config))
    assert (server.port, server.max_workers, server.batch_max_size) == (6001, 3, 7)
    _, server, _ = serve()
    assert (server.port, server.max_workers, server.batch_max_size) == (DEFAULT_PORT, DEFAULT_MAX_WORKERS, DEFAULT_MAX_BATCH_SIZE)


def test_the_config_file_may_come_from_facegallery_config(serve, tmp_path):
    config = write(tmp_path / "serve.toml", 'host = "127.0.0.1"\nlog_format = "json"\nlog_level = "warning"\n')
    result, server, logging_setup = serve(env={"FACEGALLERY_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert server.host == "127.0.0.1"
    assert logging_setup == ("WARNING", "json")


def test_booleans_can_be_turned_off_by_a_flag(serve, tmp_path):
    config = write(tmp_path / "serve.toml", "flip_augment = true\n")
    _, server, _ = serve("--config", str(config))
    assert server.pipeline.flip_augment is True
    _, server, _ = serve("--config", str(config), "--no-flip-augment")
    assert server.pipeline.flip_augment is False
    _, server, _ = serve(env={"FACEGALLERY_FLIP_AUGMENT": "yes"})
    assert server.pipeline.flip_augment is True


def test_every_key_maps_to_the_server_config(serve, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    config = write(
        tmp_path / "serve.toml",
        f'data_dir = "{tmp_path / "data"}"\nmodel_dir = "{model}"\nmemory_budget = 3\nmin_face_size = 20\nmax_detect_pixels = 20000\n'
        "max_image_bytes = 10\nmax_image_pixels = 11\nintra_op_threads = 2\nbatch_delay_ms = 1.5\nsnapshot_interval = 9.0\ngrace = 0.5\n"
        'integrity_check = "full"\nmax_streams = 2\nmax_streams_per_client = 1\nstream_idle = 4.0\nmax_connections = 5\nmetrics_port = 9100\n',
    )
    result, server, _ = serve("--config", str(config))
    assert result.exit_code == 0, result.output
    pipeline = server.pipeline
    assert (server.data_dir, server.model_dir) == (tmp_path / "data", model)
    assert (pipeline.memory_budget_bytes, pipeline.detection.min_face_size, pipeline.detection.max_detect_pixels) == (3 << 20, 20, 20000)
    assert (pipeline.max_image_bytes, pipeline.max_image_pixels, pipeline.intra_op_threads) == (10, 11, 2)
    assert (server.batch_max_delay_ms, server.snapshot_interval_s, server.grace_s, server.integrity_check) == (1.5, 9.0, 0.5, "full")
    assert (server.max_streams, server.max_streams_per_client, server.stream_idle_s, server.max_connections, server.metrics_port) == (2, 1, 4.0, 5, 9100)


def test_help_shows_the_values_in_effect_as_defaults(serve, tmp_path):
    config = write(tmp_path / "serve.toml", "max_workers = 7\n")
    result, server, _ = serve("--help", "--config", str(config), env={"FACEGALLERY_GRACE": "2.5"})
    assert result.exit_code == 0 and server is None
    text = " ".join(result.output.split())
    assert re.search(r"--max-workers INTEGER RANGE .*?\[default: 7; x>=1\]", text)
    assert re.search(r"--grace FLOAT RANGE .*?\[default: 2.5; x>=0\]", text)
    assert re.search(r"--port INTEGER RANGE .*?\[default: 50051; 0<=x<=65535\]", text)

    env_only = serve("--help", env={"FACEGALLERY_CONFIG": str(config)})[0]
    assert "[default: 7; x>=1]" in " ".join(env_only.output.split())


def test_an_unknown_key_in_the_file_is_an_error(serve, tmp_path):
    config = write(tmp_path / "serve.toml", "max_worker = 4\n")
    result, server, _ = serve("--config", str(config))
    assert result.exit_code == 2 and server is None
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: unknown key 'max_worker' in config file") and str(config) in line


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("file", "invalid port = 70000 (config file"),
        ("env", "invalid port = '70000' (environment variable FACEGALLERY_PORT)"),
    ],
    ids=["file", "env"],
)
def test_a_bad_value_names_its_key_and_source_in_one_line(serve, tmp_path, where, needle):
    config = write(tmp_path / "serve.toml", "port = 70000\n" if where == "file" else "")
    result, server, _ = serve("--config", str(config), env={"FACEGALLERY_PORT": "70000"} if where == "env" else None)
    assert result.exit_code == 2 and server is None
    (line,) = result.output.strip().splitlines()
    assert needle in line and "less than or equal to 65535" in line and "Traceback" not in result.output


def test_bad_values_of_every_kind_are_reported_together(tmp_path, monkeypatch):
    config = write(tmp_path / "serve.toml", 'log_format = "xml"\ntls_cert = "/no/such/cert.pem"\n')
    monkeypatch.setenv("FACEGALLERY_MAX_WORKERS", "many")
    with pytest.raises(SettingsError) as caught:
        ServeSettings.load(config)
    message = str(caught.value)
    assert "\n" not in message
    assert "invalid max_workers = 'many' (environment variable FACEGALLERY_MAX_WORKERS)" in message
    assert f"invalid log_format = 'xml' (config file {config})" in message
    assert "invalid tls_cert = '/no/such/cert.pem'" in message


def test_a_bad_flag_is_refused_by_its_option(serve):
    result, server, _ = serve("--max-workers", "0")
    assert result.exit_code == 2 and server is None and "'--max-workers'" in result.output


def test_a_missing_or_malformed_file_is_a_clear_error(serve, tmp_path):
    missing = serve(env={"FACEGALLERY_CONFIG": str(tmp_path / "nope.toml")})[0]
    assert missing.exit_code == 2 and f"config file {tmp_path / 'nope.toml'}: no such file" in missing.output
    broken = serve("--config", str(write(tmp_path / "broken.toml", "port = [")))[0]
    assert broken.exit_code == 2 and "broken.toml" in broken.output and "Traceback" not in broken.output


def test_the_clients_variables_are_ignored(serve):
    result, server, _ = serve(env={"FACEGALLERY_API_KEY": "fg_x", "FACEGALLERY_SERVER": "elsewhere:1", "FACEGALLERY_TIMEOUT": "x"})
    assert result.exit_code == 0, result.output
    assert (server.host, server.port) == ("localhost", DEFAULT_PORT)


def test_model_dir_from_facegallery_model_dir_goes_through_the_bootstrap(serve, tmp_path):
    """As before settings: FACEGALLERY_MODEL_DIR may name a directory the dlib model is still to be converted into."""
    _, server, _ = serve(env={"FACEGALLERY_MODEL_DIR": str(tmp_path / "not-yet")})
    assert server.model_dir == serve.default_model  # the bootstrap reads the variable itself
    result, server, _ = serve("--model-dir", str(tmp_path / "typo"))
    assert result.exit_code == 2 and server is None
    assert f"invalid model_dir = '{tmp_path / 'typo'}' (--model-dir): not a directory" in result.output


def test_tls_keys_go_together_and_name_their_source(serve, tmp_path):
    cert = write(tmp_path / "cert.pem", "x")
    config = write(tmp_path / "serve.toml", f'tls_cert = "{cert}"\n')
    result, server, _ = serve("--config", str(config))
    assert result.exit_code == 2 and server is None
    assert result.output.strip() == f"Error: tls_cert (config file {config}) needs tls_key (--tls-key) too"
    result, _, _ = serve("--host", "0.0.0.0")
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and "refusing to serve without TLS on the non-loopback address 0.0.0.0 (host, from --host)" in line


def test_sources_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGALLERY_GRACE", "1")
    settings = ServeSettings.load(write(tmp_path / "s.toml", "port = 1\n"), {"host": "::1"})
    assert settings.source_of("host") == Source("flag", "--host")
    assert settings.source_of("grace") == Source("env", "environment variable FACEGALLERY_GRACE")
    assert settings.source_of("port").kind == "file"
    assert settings.source_of("max_workers") == Source("default", "default")


def test_the_example_file_holds_every_key_at_its_default(monkeypatch):
    """docs/facegallery.example.toml parses, its values are the built-in defaults, and it names
    every key: set when the default is a fixed value, commented out otherwise."""
    settings = ServeSettings.load(EXAMPLE)
    defaults = ServeSettings.load()
    assert settings.model_dump() == defaults.model_dump()
    values = tomllib.loads(EXAMPLE.read_text())
    for key, value in values.items():
        assert getattr(defaults, key) == value, key
    commented = set(re.findall(r"^# (\w+) = ", EXAMPLE.read_text(), flags=re.MULTILINE))
    assert set(values) | commented == set(ServeSettings.model_fields)
    assert not set(values) & commented
    for key in commented:  # no fixed default: None, or a directory of the user's
        field = ServeSettings.model_fields[key]
        assert field.default is None or field.default_factory is not None, key
