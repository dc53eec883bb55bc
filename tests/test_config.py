"""Named configs, YAML files and --set overrides."""
from __future__ import annotations

import pytest

from etegrec.config import ConfigError, load_config, named_configs


def test_packaged_configs_are_ml100k_paper_and_tiny():
    assert {"ml-100k", "paper", "tiny"} <= set(named_configs())


def test_paper_config_has_the_paper_model_sizes():
    c = load_config("paper")
    r = c.recommender
    assert (r.num_layers, r.num_decoder_layers, r.d_model, r.d_ff, r.num_heads, r.d_kv) == (6, 6, 128, 512, 4, 64)
    assert (c.tokenizer.num_layers, c.tokenizer.codebook_size, c.tokenizer.e_dim) == (3, 256, 128)
    assert c.tokenizer.hidden_dims == [512, 256]


def test_set_overrides_a_key_with_a_yaml_typed_value():
    c = load_config("tiny", ["rqvae.lr=2e-3", "tokenizer.hidden_dims=[8, 4]", "data.max_users=null"])
    assert c.rqvae.lr == 2e-3 and c.tokenizer.hidden_dims == [8, 4] and c.data.max_users is None


def test_an_int_is_accepted_for_a_float_key_and_stored_as_float():
    assert load_config("tiny", ["rqvae.lr=1"]).rqvae.lr == 1.0


def test_unknown_key_lists_close_matches_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'rqvae\.lrr'; did you mean rqvae\.lr.*valid keys: "):
        load_config("tiny", ["rqvae.lrr=1"])


def test_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"'embed\.epochs' expects int, got 'many'"):
        load_config("tiny", ["embed.epochs=many"])


def test_non_positive_size_is_an_error():
    with pytest.raises(ConfigError, match=r"'tokenizer\.codebook_size' must be positive, got 0"):
        load_config("tiny", ["tokenizer.codebook_size=0"])


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config("tiny", ["rqvae.lr"])


def test_yaml_file_with_an_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("rqvae:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown config key 'rqvae\.learning_rate'"):
        load_config(str(path))


def test_missing_config_names_the_packaged_ones():
    with pytest.raises(ConfigError, match=r"'nope' is neither a packaged config \(.*tiny.*\) nor an existing YAML"):
        load_config("nope")


def test_yaml_file_sections_override_only_what_they_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("embed:\n  epochs: 7\n")
    c = load_config(str(path))
    assert c.embed.epochs == 7 and c.embed.hidden == 256


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    import yaml

    from etegrec.training import joint

    assert joint.main(["--print-config", "--set", "joint.cycle=5", "--output-dir", str(tmp_path / "run")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["joint"]["cycle"] == 5 and printed["recommender"]["encoder_input"] == "items"  # ml-100k's
    assert not (tmp_path / "run").exists()


def test_help_lists_the_named_configs_with_what_each_is_for(capsys):
    from etegrec.training import joint

    with pytest.raises(SystemExit):
        joint.main(["--help"])
    out = capsys.readouterr().out
    assert "ml-100k    Default: MovieLens-100K" in out and "paper " in out and "tiny " in out
    assert "--print-config" in out and "examples:" in out


def test_the_config_reference_in_docs_is_up_to_date_with_every_key():
    from pathlib import Path

    from etegrec.config import Config
    from etegrec.config_reference import KEY_DOCS, render

    assert set(KEY_DOCS) == set(Config().keys())  # a new key needs its line (and a stale line goes)
    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text() == render(), "regenerate: python -m etegrec.config_reference > docs/config.md"


def test_python_m_etegrec_lists_the_stages_and_their_commands():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "etegrec"], capture_output=True, text=True, check=True).stdout
    for command in ("python -m etegrec.data", "python -m etegrec.training.embed", "python -m etegrec.training.rqvae",
                    "python -m etegrec.training.joint"):
        assert command in out
