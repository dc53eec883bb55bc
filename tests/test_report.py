"""The offline report: its figures hold the values of the events, for one run, two runs and a killed one;
the page loads in a real headless browser where one is installed."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import tiny_command
from etegrec.hooks import read_events
from etegrec.report import FIGURES, figure_series, load_run_record, main, render_html


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for seed in (1, 2):
        tiny_command(root, "joint", "--wandb-mode", "disabled", "--seed", str(seed), "--set", "embed.epochs=1",
                     "--set", "rqvae.epochs=2", "--output-dir", str(root / f"seed{seed}"))
    killed = root / "killed"
    shutil.copytree(root / "seed1", killed)
    log = (killed / "events.jsonl").read_text()
    (killed / "events.jsonl").write_text(log[: len(log) * 2 // 3].rstrip("\n")[:-7])  # torn mid-line
    (killed / "metrics.json").unlink()
    return root


def test_figure_data_are_the_values_of_the_events(runs):
    events = read_events(runs / "seed1" / "events.jsonl")
    series = figure_series(load_run_record(runs / "seed1"))
    valid = [e for e in events if e["signal"] == "evaluated" and e["split"] == "valid"]
    (label, xs, ys), *test = series["ndcg"]["ndcg@10"]
    assert label == "valid" and xs == [e["epoch"] for e in valid] and ys == [e["metrics"]["ndcg@10"] for e in valid]
    assert test[0][0] == "test" and test[0][2] == [next(e for e in events if e.get("split") == "test")["metrics"]["ndcg@10"]]
    assigned = [e for e in events if e["signal"] == "codes_assigned"]
    assert series["conflict"]["max_conflict"][0][2] == [e["max_conflict"] for e in assigned]
    assert series["changed"]["codes changed"][0][2] == [e["changed"] / len(e["codes"]) for e in assigned[1:]]
    usage = [e for e in events if e["signal"] == "codebook_usage" and e["layer"] == 2]
    (panel, [(_, _, counts)]), = [(p, v) for p, v in series["usage"].items() if p.startswith("layer 2")]
    assert panel == f"layer 2 (epoch {usage[-1]['epoch']})" and counts == usage[-1]["counts"]
    probes = [e for e in events if e["signal"] == "probed"]
    assert dict((l, y) for l, _, y in series["probes"]["NLL (nats)"])["item_nll"] == [p["probes"]["item_nll"]
                                                                                     for p in probes]
    for key in ("utilization", "perplexity", "gini"):
        layer0 = [e for e in events if e["signal"] == "codebook_usage" and e["layer"] == 0]
        assert dict((l, y) for l, _, y in series[key][key])["layer 0"] == [e[key] for e in layer0]
    assert series["collision"]["collision rate"][0][2] == [e["collision_rate"] for e in assigned]
    recall = dict((l, y) for l, _, y in series["recall"]["recall@10"])
    assert recall["valid"] == [e["metrics"]["recall@10"] for e in valid]
    ends = [e for e in events if e["signal"] == "epoch_end"]
    assert dict((l, y) for l, _, y in series["lr"]["learning rate"])["rec"] == [e["lr"]["rec"] for e in ends]
    rec = [e for e in events if e["signal"] == "epoch_end" and e["phase"] == "rec"]
    assert dict((l, y) for l, _, y in series["losses"]["rec"])["code_loss"] == [e["losses"]["code_loss"] for e in rec]


def test_loss_shares_are_each_weighted_part_over_what_trains_each_model(runs):
    """The tiny config aligns from epoch 1 and freezes the recommender in tokenizer epochs: the tokenizer's
    shares are its RQ-VAE and alignment parts in id epochs, the recommender's its code and alignment parts."""
    events = read_events(runs / "seed1" / "events.jsonl")
    shares = figure_series(load_run_record(runs / "seed1"))["shares"]
    ends = [e for e in events if e["signal"] == "epoch_end" and e.get("weights")]
    aligned_id = next(e for e in ends if e["phase"] == "id" and e["weights"]["kl_loss"] > 0)
    w, l = aligned_id["weights"], aligned_id["losses"]
    total = w["vq_loss"] * l["vq_loss"] + w["kl_loss"] * l["kl_loss"] + w["dec_cl_loss"] * l["dec_cl_loss"]
    tokenizer = {label: dict(zip(xs, ys)) for label, xs, ys in shares["tokenizer"]}
    assert set(tokenizer) == {"vq_loss", "kl_loss", "dec_cl_loss"}  # the code loss never reaches the tokenizer
    assert tokenizer["kl_loss"][aligned_id["epoch"]] == pytest.approx(w["kl_loss"] * l["kl_loss"] / total)
    recommender = {label: dict(zip(xs, ys)) for label, xs, ys in shares["recommender"]}
    assert "vq_loss" not in recommender
    rec_epochs = {e["epoch"] for e in ends if e["phase"] != "id"}  # frozen in id epochs (tiny: id_trains_rec off)
    assert set(recommender["code_loss"]) == rec_epochs
    for epoch in rec_epochs:  # each epoch's shares sum to one
        assert sum(r.get(epoch, 0.0) for r in recommender.values()) == pytest.approx(1.0)
    finetune = [e["epoch"] for e in ends if e["phase"] == "finetune"]  # the code loss alone: all of it
    assert finetune and all(recommender["code_loss"][epoch] == 1.0 for epoch in finetune)


@pytest.mark.parametrize("names", [["seed1"], ["seed1", "seed2"], ["killed"]], ids=["one", "two", "killed"])
def test_the_page_has_every_figure_and_the_final_metrics(runs, names, tmp_path):
    assert main([str(runs / n) for n in names] + ["--output", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    for key in FIGURES:
        assert re.search(rf'<figure id="{key}"><figcaption>[^<]+</figcaption><img alt="[^"]+" src="data:image/png;base64,',
                         page), key
    if names == ["killed"]:
        assert "not finished" in page
    else:
        assert "test ndcg@10" in page
    if len(names) == 2:  # the key the two runs differ in is listed
        assert "run.seed" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium here (Debian package chromium)")
def test_the_page_loads_in_a_headless_browser_with_every_figure_drawn(runs, tmp_path):
    page = tmp_path / "r.html"
    (page).write_text(render_html([load_run_record(runs / "seed1"), load_run_record(runs / "seed2")]))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("data:image/png;base64,") == len(FIGURES)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1400,6000", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 50_000  # the figures are drawn, not an empty page


def _torn(name, cut):
    def make(run_dir, tmp_path):
        text = (run_dir / name).read_text()
        (run_dir / name).write_text(text[: cut(text)])  # as a full disk or a kill leaves it
        return [str(run_dir), "--output", str(tmp_path / "r.html")]
    return make


BAD_REPORTS = [  # issue 24: each one line naming the file or option, exit status 2
    ("torn config.yaml", _torn("config.yaml", lambda text: text.index("  cycle:") + 4),  # "joint:\n  epochs: 4\n  cy"
     r"config\.yaml' is not valid YAML .*restore it"),
    ("torn config.yaml section", _torn("config.yaml", lambda text: text.index("joint:") + 10),  # "joint:\n  ep"
     r"config\.yaml' holds a section 'joint' that is a str, not the mapping a run writes"),
    ("torn metrics.json", _torn("metrics.json", lambda text: len(text) // 2),
     r"metrics\.json' is not valid JSON .*restore it"),
    ("output into a missing directory",
     lambda run_dir, tmp_path: [str(run_dir), "--output", str(tmp_path / "no" / "r.html")],
     r"--output '.*no/r\.html': the directory '.*no' does not exist"),
]


@pytest.mark.parametrize("name,make_args,message", BAD_REPORTS, ids=[b[0] for b in BAD_REPORTS])
def test_a_bad_report_input_is_one_line_naming_it(runs, name, make_args, message, tmp_path, capsys):
    import time

    run_dir = tmp_path / "run"
    shutil.copytree(runs / "seed1", run_dir)
    start = time.perf_counter()
    assert main(make_args(run_dir, tmp_path)) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "r.html").exists()
