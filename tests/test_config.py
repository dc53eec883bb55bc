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


# --- issue 24: a file of the user's changes only what it names --------------------------------------

def _differences(a, b) -> list[str]:
    a, b = a.to_dict(), b.to_dict()
    return [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s][k]]


def test_a_partial_config_file_is_layered_on_the_default_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("joint: {epochs: 2}\n")
    assert _differences(load_config(str(path)), load_config("ml-100k")) == ["joint.epochs"]


def test_a_config_file_is_layered_on_the_base_it_names(tmp_path):
    (tmp_path / "short.yaml").write_text("base: tiny\njoint: {epochs: 2}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "seeded.yaml").write_text("base: ../short.yaml\nrun: {seed: 7}\n")  # relative to the file
    seeded = load_config(str(tmp_path / "sub" / "seeded.yaml"))
    assert _differences(seeded, load_config("tiny")) == ["joint.epochs", "run.seed"]
    assert (seeded.joint.epochs, seeded.run.seed) == (2, 7)


def test_a_cycle_of_bases_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml' is its own base, through .*a\.yaml -> .*b\.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_an_unknown_base_names_the_file_that_asks_for_it(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: tinyy\n")
    with pytest.raises(ConfigError, match=r"'tinyy' \(the base: of '.*mine\.yaml'\) is neither a packaged config"):
        load_config(str(tmp_path / "mine.yaml"))


def test_print_config_shows_a_partial_file_on_the_default_config(tmp_path, capsys):
    import yaml

    from etegrec.training import joint

    (tmp_path / "mine.yaml").write_text("joint: {epochs: 2}\n")
    assert joint.main(["--config", str(tmp_path / "mine.yaml"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("ml-100k").to_dict()
    expected["joint"]["epochs"] = 2
    assert printed == expected


def test_a_runs_own_config_yaml_keeps_the_built_in_default_of_a_key_added_since(tmp_path):
    import yaml

    from etegrec.config import Config, run_config

    saved = load_config("tiny").to_dict()
    del saved["codes"]["margin"]  # a run from before the key: it ran with the built-in default
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run_config(tmp_path / "config.yaml").codes.margin == Config().codes.margin == 0.0
    assert load_config("ml-100k").codes.margin == 0.1  # what layering on ml-100k would have given


def test_a_runs_config_yaml_written_before_the_joint_section_was_split_loads_under_the_new_names(tmp_path):
    import yaml

    from etegrec.config import run_config

    saved = load_config("tiny").to_dict()
    for section in ("losses", "codes", "evaluation"):
        del saved[section]
    del saved["recommender"]["renormalize"], saved["joint"]["lr_warmup_epochs"]
    saved["joint"].update(warm_epoch=3, warmup_epochs=0.25, rec_kl_weight=0.0, code_margin=0.2, eval_step=2,
                          eval_batch_size=32, beam_size=12, renormalize=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    config = run_config(tmp_path / "config.yaml")
    assert (config.losses.align_from_epoch, config.joint.lr_warmup_epochs, config.losses.rec_kl_weight) == (3, 0.25, 0.0)
    assert (config.codes.margin, config.evaluation.every_epochs, config.evaluation.batch_size) == (0.2, 2, 32)
    assert (config.evaluation.beam_size, config.recommender.renormalize) == (12, True)


def test_an_old_joint_key_in_set_is_refused_naming_its_new_key():
    with pytest.raises(ConfigError, match=r"^--set: config key 'joint\.eval_step' moved to 'evaluation\.every_epochs'"):
        load_config("tiny", ["joint.eval_step=2"])


def test_a_named_amazon_dataset_brings_the_amazon_config_unless_one_is_given(tmp_path, monkeypatch):
    from etegrec.training.run.cli import common_parser, parse_stage_args

    monkeypatch.setenv("ETEGREC_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def resolved(*argv):
        return parse_stage_args(common_parser("python -m etegrec.training.joint", "x"),
                                [*argv, "--output-dir", str(tmp_path / "run")]).config

    amazon = resolved("--dataset", "amazon-sports")
    assert amazon.data.dataset == "amazon-sports"
    assert amazon.to_dict() == load_config("amazon", ["data.dataset=amazon-sports"]).to_dict()
    assert resolved("--dataset", "amazon-sports", "--config", "tiny").joint.epochs == load_config("tiny").joint.epochs
    assert resolved().to_dict() == load_config("ml-100k").to_dict()


def test_embed_loss_is_full_or_sampled():
    assert load_config("tiny", ["embed.loss=sampled"]).embed.loss == "sampled"
    with pytest.raises(ConfigError, match=r"'embed\.loss' must be one of full, sampled, got 'chunked'"):
        load_config("tiny", ["embed.loss=chunked"])


def test_the_configs_choices_are_the_models_and_forges_own():
    # config_rules imports no model code, so it repeats these tuples; they must not drift apart
    from etegrec.config_rules import ENCODER_INPUTS, FORGE_POLICIES, ITEM_STATES
    from etegrec.forge.assign import POLICIES
    from etegrec.models import recommender

    assert ENCODER_INPUTS == recommender.ENCODER_INPUTS
    assert ITEM_STATES == recommender.ITEM_STATES
    assert FORGE_POLICIES == POLICIES
