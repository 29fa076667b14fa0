"""surgeon.analysis.report and `surgeon report`: tables, figures, index pages, errors."""

from __future__ import annotations

import csv
import html
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import typer
from surgeon_cli.common import report_error
from surgeon_cli.report import report_command

from surgeon import analysis, rundir
from surgeon.analysis.report import _site_order, epochs_to_target, md_escape, summary_row
from surgeon.errors import AnalysisError, SurgeonError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ["x", "features_1", "features_3", "features_5"]
STEPS_PER_EPOCH = 5


def write_run(
    folder: Path,
    variant: str,
    lr: float,
    seed: int,
    val_errs: list[float],
    *,
    diverge_at: int | None = None,
    probe: bool = True,
) -> Path:
    """A run folder as `surgeon train` writes it (JSON only: report reads no weights)."""
    name = f"{variant}_lr{lr:g}_s{seed}"
    run = folder / name
    run.mkdir(parents=True)
    config = {"name": name, "variant": variant, "lr": lr, "seed": seed, "ema": 0.9, "epochs": len(val_errs)}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    rows, ema, step = [], None, 0
    for e, err in enumerate(val_errs):
        for i in range(STEPS_PER_EPOCH):
            step += 1
            if diverge_at is not None and step >= diverge_at:
                break
            loss = 2.3 * err + 0.1 * (STEPS_PER_EPOCH - i) / STEPS_PER_EPOCH  # saw-tooth
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            rows.append({"type": "step", "step": step, "epoch": e, "loss": loss, "ema_loss": ema, "lr": lr})  # fmt: skip
        if diverge_at is not None and step >= diverge_at:
            break
        rows.append({"type": "epoch", "epoch": e + 1, "step": step, "train_loss": 2 * err, "train_err": err - 0.05,
                     "train_acc": 1.05 - err, "val_loss": 2 * err, "val_err": err, "val_acc": 1 - err,
                     "time_s": 1.0, "images_per_s": 100.0})  # fmt: skip
        if probe:
            for d, site in enumerate(SITES):
                rows.append({"type": "probe", "epoch": e + 1, "step": step, "site": site, "act_mean": 0.1 * d + seed,
                             "act_std": 1.0 + 0.1 * d, "grad_norm_before": 0.01 * (d + 1) * (e + 1),
                             "grad_norm_after": 0.02 * (d + 1)})  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = [r for r in rows if r["type"] == "epoch"]
    errs = [r["val_err"] for r in done]
    best = min(errs) if errs else None
    summary = {
        "name": name, "variant": variant, "lr": lr, "seed": seed,
        "status": "diverged" if diverge_at else "ok",
        "final_val_err": errs[-1] if errs else None, "best_val_err": best,
        "best_epoch": errs.index(best) + 1 if errs else 0, "epochs_run": len(errs),
        "diverged_at_step": diverge_at, "message": f"non-finite loss at step {diverge_at}" if diverge_at else None,
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A recipe folder: 3 variants x 2 LRs, two seeds of shift/scale, one diverged run."""
    root = tmp_path_factory.mktemp("recipe") / "thesis"
    for lr in (0.02, 0.04):
        write_run(root, "plain", lr, 0, [0.6, 0.5, 0.45, 0.44])
        write_run(root, "batchnorm", lr, 0, [0.5, 0.4, 0.35, 0.30])
        write_run(root, "shift-layer+scale-layer", lr, 0, [0.55, 0.42, 0.36, 0.37])
        write_run(root, "shift-layer+scale-layer", lr, 1, [0.57, 0.44, 0.38, 0.35])
    write_run(root, "shift-channel+scale-channel", 0.04, 0, [0.5, 0.45, 0.4, 0.4], diverge_at=12)
    (root / "results.json").write_text(json.dumps({"recipe": "thesis-mlp", "runs": []}))
    return root


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0, f"{path} is blank"


def test_find_runs(recipe, tmp_path):
    found = analysis.find_runs(recipe)
    assert len(found) == 9 and {e for _, e in found} == {"thesis-mlp"}
    assert analysis.find_runs(recipe / "plain_lr0.02_s0") == [(recipe / "plain_lr0.02_s0", "")]
    parent = analysis.find_runs(recipe.parent)  # a folder of recipe folders
    assert len(parent) == 9 and {e for _, e in parent} == {"thesis-mlp"}


def test_read_metrics_skips_damaged_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"type": "step", "step": 2, "loss": 1.0}\n{"type": "step", "step": 1, "loss": 2.0}\n{"type": "epo'
    )
    steps, epochs, probes, warnings = analysis.read_metrics(path)
    assert [s["step"] for s in steps] == [1, 2] and not epochs and not probes
    assert "1 damaged line" in warnings[0]


def test_summary_rows_and_target(recipe):
    run = analysis.load_run(recipe / "batchnorm_lr0.04_s0", "thesis-mlp")
    assert epochs_to_target(run, 0.35) == 3
    assert epochs_to_target(run, 0.2) is None
    row = summary_row(run, 0.4)
    assert row["best_val_err"] == 0.3 and row["best_epoch"] == 4 and row["final_val_err"] == 0.3
    assert row["epochs_to_target"] == 2 and row["status"] == "ok"


def test_summary_without_summary_json(recipe, tmp_path):
    run = write_run(tmp_path, "plain", 0.04, 0, [0.6, 0.5, 0.55])
    (run / "summary.json").unlink()
    row = summary_row(analysis.load_run(run), None)
    assert (
        row["status"] == "incomplete"
        and row["best_val_err"] == 0.5
        and row["final_val_err"] == 0.55
    )
    assert row["best_epoch"] == 2


def test_probe_sites_ordered_by_depth(tmp_path):
    run = write_run(tmp_path, "plain", 0.04, 0, [0.5])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if r["type"] == "probe"]
    for r in probes:
        r["index"] = SITES.index(r["site"])
    rest = [r for r in rows if r["type"] != "probe"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rest + probes[::-1]))
    assert _site_order([analysis.load_run(run)]) == SITES


def test_build_report(recipe, tmp_path):
    out = tmp_path / "report"
    rep = analysis.build_report([recipe], out)
    # default target: the best error of any run (0.30) + 5 points
    assert rep["target_err"] == pytest.approx(0.35)
    assert len(rep["runs"]) == 9
    assert rep["diverged"] == ["shift-channel+scale-channel_lr0.04_s0"]
    bn = next(r for r in rep["runs"] if r["run"] == "batchnorm_lr0.04_s0")
    assert bn["epochs_to_target"] == 3
    ss = [
        a for a in rep["variants"] if a["variant"] == "shift-layer+scale-layer" and a["lr"] == 0.04
    ]
    (agg,) = ss
    assert agg["runs"] == 2 and agg["best_val_err_mean"] == pytest.approx(0.355)
    assert agg["best_val_err_std"] == pytest.approx(math.sqrt(2 * 0.005**2))
    assert agg["final_val_err_mean"] == pytest.approx(0.36)
    # plain first, then batchnorm, within each LR
    assert [r["variant"] for r in rep["runs"][:2]] == ["plain", "batchnorm"]
    files = sorted(f["file"] for f in rep["figures"])
    assert files == sorted(
        f"{k}_thesis-mlp_lr{lr}.png"
        for k in ("loss", "val_err", "probes")
        for lr in ("0.02", "0.04")
    )
    for f in files:
        assert_png(out / f)
    md = (out / "index.md").read_text()
    for f in files:
        assert f"]({f})" in md
    assert "35.00%" in md and "Diverged runs" in md and "non-finite loss at step 12" in md
    assert "EMA" in md
    page = (out / "index.html").read_text()
    assert page.startswith("<!doctype html>") and all(f'src="{f}"' in page for f in files)
    with open(out / "summary.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 9
    saved = json.loads((out / "report.json").read_text())
    assert saved["target_err"] == pytest.approx(0.35) and len(saved["figures"]) == 6


def test_target_err_option_and_plain_runs(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "runs", "plain", 0.04, seed, [0.6, 0.5], probe=False)
    rep = analysis.build_report([tmp_path / "runs" / "plain_lr0.04_s0", tmp_path / "runs" / "plain_lr0.04_s1"], tmp_path / "out", target_err=0.55)  # fmt: skip
    assert rep["target_err"] == 0.55 and rep["target_err_source"] == "given"
    assert [r["epochs_to_target"] for r in rep["runs"]] == [2, 2]
    assert sorted(f["file"] for f in rep["figures"]) == ["loss_lr0.04.png", "val_err_lr0.04.png"]


def test_every_figure_has_axis_labels_and_a_title(recipe, tmp_path, monkeypatch):
    from surgeon.analysis import plots, report

    drawn, save = [], plots.save
    monkeypatch.setattr(report, "save", lambda fig, path: drawn.append((fig, path)) or save(fig, path))  # fmt: skip
    online = write_run(tmp_path / "online", "batchnorm", 0.01, 0, [0.6], probe=False)
    config = json.loads((online / "config.json").read_text())
    (online / "config.json").write_text(json.dumps({**config, "online": True}))
    steps = [{"type": "step", "step": i, "loss": 1.0, "online_acc": 0.1 * i, "online_acc_window": 0.1} for i in range(1, 5)]  # fmt: skip
    (online / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    analysis.build_report([recipe, online], tmp_path / "out")
    kinds = {Path(p).name.split("_")[0] for _, p in drawn}
    assert kinds == {"loss", "val", "probes", "online"}
    for fig, path in drawn:
        assert plots.missing_labels(fig) == [], path
    fig, (ax,) = plots.figure()
    ax.plot([0, 1])
    assert plots.missing_labels(fig) == ["no title", "panel (row 0, col 0): no y-axis label", "panel (row 0, col 0): no x-axis label"]  # fmt: skip


# ----------------------------------------------------------------- the page

VOID = {"meta", "img", "hr", "br", "link"}


class Page(HTMLParser):
    """Tags (with their attributes) and the text inside each, checking that every element
    is closed in order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: dict[str, list[str]] = {}
        self.open: list[str] = []
        self.data: list[str] = []
        self.feed(text)
        self.close()
        assert not self.open, f"unclosed: {self.open}"

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)
            self.text.setdefault(tag, []).append("")

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.data.append(data)
        for tag in set(self.open):
            self.text[tag][-1] += data

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


HOSTILE = "<script>alert('x')</script> *bold* _it_ `tick` [l](u) & | #"
VARIANT = "<b>$\\bad{$</b>"  # "$...$" would stop matplotlib if it were read as mathtext


@pytest.fixture(scope="module")
def hostile_report(recipe, tmp_path_factory) -> tuple[Path, dict]:
    """The recipe's runs plus one whose name, variant, message and experiment are markup."""
    root = tmp_path_factory.mktemp("hostile")
    exp = root / "exp"
    run = write_run(exp, "plain", 0.04, 7, [0.6, 0.5], diverge_at=8)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(name=HOSTILE, variant=VARIANT, message="<img src=x onerror=alert(1)>")
    (run / "summary.json").write_text(json.dumps(summary))
    (exp / "results.json").write_text(json.dumps({"recipe": "<i>exp</i>", "runs": []}))
    out = root / "report"
    return out, analysis.build_report([recipe, exp], out)


def test_index_html_is_a_rendered_page(hostile_report):
    out, rep = hostile_report
    text = (out / "index.html").read_text()
    page = Page(text)
    assert text.startswith("<!doctype html>") and page.all("meta")[0] == {"charset": "utf-8"}
    assert page.text["h1"] == ["Training report"]
    assert {"Summary", "By variant and learning rate", "Diverged runs", "Error per epoch"} <= set(
        page.text["h2"]
    )
    assert "<i>exp</i>, lr 0.04" in page.text["h3"]  # a group title, as text
    assert len(page.all("table")) == 2 and len(page.all("th")) >= 18
    assert page.text["em"] == ["epochs to target"]
    assert HOSTILE in page.text["code"] and html.escape(HOSTILE) in text
    # markup from run folders is text: no element of it reaches the page
    assert {t for t, _ in page.tags} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "em", "code",
        "div", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "figure", "a", "img", "hr",
    }  # fmt: skip
    assert "<script" not in text and "<b>" not in text and "onerror=alert(1)>" not in text
    imgs = page.all("img")
    assert sorted(i["src"] for i in imgs) == sorted(f["file"] for f in rep["figures"])
    assert all(i["alt"] and (out / i["src"]).is_file() for i in imgs)
    # nothing left as markdown, nothing fetched from elsewhere
    body = "".join(page.data).replace(HOSTILE, "").replace(VARIANT, "")
    assert "*" not in body and "`" not in body and "](" not in body and "\\" not in body
    links = [a["href"] for a in page.all("a")]
    assert all(":" not in h and not h.startswith("/") for h in links)
    assert {"summary.csv", "report.json"} <= set(links)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    diverged_rows = [a for t, a in page.tags if t == "tr" and a.get("class") == "diverged"]
    assert len(diverged_rows) == 4  # two runs in the summary, two variant rows


def test_index_md_and_html_show_the_same_content(hostile_report):
    out, _ = hostile_report
    md = (out / "index.md").read_text()
    page = Page((out / "index.html").read_text())
    for level in (1, 2, 3):
        heads = [
            line[level + 1 :] for line in md.splitlines() if line.startswith("#" * level + " ")
        ]
        assert [h.replace("\\", "") for h in heads] == page.text[f"h{level}"]
    assert len([line for line in md.splitlines() if line.startswith("| --- |")]) == 2
    figures = re.findall(r"^!\[.+\]\(([\w.+-]+\.png)\)$", md, flags=re.M)
    assert figures == [i["src"] for i in page.all("img")]
    # emphasis: only ours; the run name's stars are escaped, or inside code
    markup = re.sub(r"`[^`]*`", "", re.sub(r"\\.", "", re.sub(r"``.*?``", "", md)))
    assert re.findall(r"\*[^*]*\*", markup) == ["*epochs to target*"]
    assert md_escape(HOSTILE) in md and "<" not in markup  # raw HTML only inside code


def test_md_escape():
    assert md_escape("plain_lr0.04_s0") == "plain_lr0.04_s0"  # inside a word: plain text
    assert md_escape("_x_ *y* `z` [a](b) <c> d|e & f") == (
        "\\_x\\_ \\*y\\* \\`z\\` \\[a\\](b) \\<c\\> d\\|e \\& f"
    )
    assert md_escape("# h") == "\\# h" and md_escape("a # b") == "a # b"
    assert md_escape("two\nlines") == "two lines"


# ----------------------------------------------------------------- CLI


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Call the command like `surgeon` does: known errors -> one line on stderr, exit 2."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("report")(report_command)

    @app.callback()
    def _root() -> None:
        """test app"""

    code = 0
    try:
        app(args=[str(a) for a in args], standalone_mode=False)
    except SurgeonError as exc:
        code = report_error(exc)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_report(recipe, tmp_path, capsys):
    runs = [recipe / "batchnorm_lr0.04_s0", recipe / "shift-channel+scale-channel_lr0.04_s0"]
    code, out, err = run_cli(capsys, "report", *runs, "-o", tmp_path / "r", "--target-err", "0.4")
    assert code == 0, err
    assert "batchnorm_lr0.04_s0" in out and "diverged" in out and "index.md" in out
    assert "target error 40.00% (given)" in out
    assert (tmp_path / "r" / "index.html").is_file()
    code, out, err = run_cli(capsys, "report", recipe / "plain_lr0.02_s0", "-o", tmp_path / "j", "--json")  # fmt: skip
    assert code == 0, err
    obj = json.loads(out)  # exactly one JSON object
    assert [r["run"] for r in obj["runs"]] == ["plain_lr0.02_s0"] and obj["index"].endswith(
        "index.md"
    )


@pytest.mark.parametrize("case", ["missing", "empty", "bad_target"])
def test_cli_report_errors(case, tmp_path, capsys, recipe):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    args = {
        "missing": [tmp_path / "nope"],
        "empty": [tmp_path / "empty"],
        "bad_target": [recipe, "--target-err", "35"],
    }[case]
    code, out, err = run_cli(capsys, "report", *args, "-o", tmp_path / "out")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hint: " in lines[0]
    expected = {
        "missing": "does not exist",
        "empty": "holds no runs",
        "bad_target": "--target-err",
    }[case]
    assert expected in lines[0]


def test_no_runs_is_an_analysis_error(tmp_path):
    with pytest.raises(AnalysisError, match="holds no runs"):
        analysis.build_report([tmp_path], tmp_path / "out")


def test_run_folder_files_keep_their_bytes(tmp_path):
    """The run-folder writers (surgeon.rundir) write the format runs have always had."""
    summary = {"name": "r", "variant": "plain", "lr": 0.04, "seed": 0, "status": "ok", "x": 1}
    rundir.write_summary(tmp_path, summary)
    assert (tmp_path / "summary.json").read_bytes() == (
        json.dumps(summary, indent=2) + "\n"
    ).encode()
    header = b"name,variant,lr,seed,status,final_val_err,best_val_err,best_epoch,epochs_run,"
    header += b"steps,diverged_at_step,message,selected_on,test_err_at_best,final_test_err\r\n"
    assert (tmp_path / "summary.csv").read_bytes() == header + b"r,plain,0.04,0,ok,,,,,,,,,,\r\n"
    rundir.write_results(tmp_path, "quick", [summary])
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "recipe": "quick",
        "runs": [summary],
    }
    assert (tmp_path / "results.csv").read_bytes() == (tmp_path / "summary.csv").read_bytes()
    rows = [{"type": "step", "step": s, "loss": 1.5} for s in (1, 2)] + [
        {"type": "epoch", "epoch": 1}
    ]
    rundir.append_metrics(tmp_path, rows)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    rundir.truncate_metrics(tmp_path, step=1, epoch=0)  # as a resume from step 1 does
    assert rundir.read_metrics(tmp_path)[:2] == ([rows[0]], [])
    assert rundir.is_run_folder(tmp_path) and not list(tmp_path.glob(".*"))


def _row(variant, seed, test, tag="", lr=0.04, cell="c"):
    return {
        "experiment": "e", "variant": variant, "tag": tag, "lr": lr, "seed": seed,
        "status": "ok", "selected_on": "val", "best_val_err": test, "test_err_at_best": test,
        "final_val_err": test, "final_test_err": test, "final_train_err": 0.1,
        "final_ema_loss": 1.0, "epochs_to_target": None, "cell": f"{variant}{tag}{cell}",
    }  # fmt: skip


def test_seeds_aggregate_to_mean_std_n_and_close_cells_are_marked():
    from surgeon.analysis.report import aggregate, variant_table

    rows = [_row("plain", s, v) for s, v in enumerate((0.50, 0.52, 0.54))]
    rows += [_row("batchnorm", s, v) for s, v in enumerate((0.49, 0.51, 0.53))]
    rows += [_row("scale-layer", s, v) for s, v in enumerate((0.40, 0.41, 0.42))]
    rows += [_row("scale-layer", 0, 0.3, tag="warm")]  # a case: its own cell, one seed
    agg = {(a["variant"], a["tag"]): a for a in aggregate(rows)}
    plain = agg[("plain", "")]
    assert plain["runs"] == 3 and plain["seeds"] == [0, 1, 2]
    assert plain["test_err_at_best_mean"] == pytest.approx(0.52)
    assert plain["test_err_at_best_std"] == pytest.approx(0.02)
    assert agg[("scale-layer", "warm")]["best_in_group"]  # lowest mean...
    assert agg[("scale-layer", "warm")]["test_err_at_best_std"] is None
    assert not agg[("scale-layer", "")]["within_spread"]  # ...but no spread: nothing within it
    header, cells = variant_table(list(agg.values()))
    assert "case" in header and "test err at best epoch" in header and "n" in header
    assert any("(best)" in c for row in cells for c in row)
    # among the three-seed cells alone, batch norm is within plain's spread of the best
    agg3 = {a["variant"]: a for a in aggregate([r for r in rows if not r["tag"]])}
    assert agg3["scale-layer"]["best_in_group"]
    assert not agg3["plain"]["within_spread"] and not agg3["batchnorm"]["within_spread"]
    close = aggregate([_row("plain", s, v) for s, v in enumerate((0.41, 0.43, 0.45))] + rows[6:9])
    assert {a["variant"]: a["within_spread"] for a in close}["plain"]


def test_within_spread_and_mean_std():
    from surgeon.analysis.stats import mean_std, within_spread

    assert mean_std([1.0, 3.0, None, float("nan")]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([1.0]) == (1.0, None) and mean_std([]) == (None, None)
    assert within_spread((0.50, 0.02), (0.48, 0.02))
    assert not within_spread((0.50, 0.01), (0.45, 0.01))
    assert not within_spread((0.50, None), (0.50, 0.01))


def test_sawtooth_measures_rises_at_epoch_boundaries():
    from surgeon.analysis.stats import sawtooth

    per_epoch, epochs = 16, 4
    ends = [per_epoch * e for e in range(1, epochs + 1)]
    # a loss that jumps up by 0.5 at every new epoch and falls within it
    tooth = {s: 2.0 - 0.02 * s + (0.5 if (s - 1) % per_epoch < 2 else 0.0) for s in range(1, 65)}
    out = sawtooth(tooth, ends)
    assert out["boundary_rise"] > 0.4 and abs(out["mid_rise"]) < 0.1 and out["sawtooth"] > 0.4
    smooth = sawtooth({s: 2.0 - 0.02 * s for s in range(1, 65)}, ends)
    assert smooth["sawtooth"] == pytest.approx(0.0, abs=1e-9)
    assert sawtooth({}, ends[:1])["sawtooth"] is None


def test_folders_without_a_hold_out_read_as_selected_on_test(tmp_path):
    """A run folder from before the validation split: its val errors are test errors."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "r", "variant": "plain", "lr": 0.04}))
    summary = {"name": "r", "variant": "plain", "lr": 0.04, "seed": 0, "status": "ok",
               "best_val_err": 0.4, "best_epoch": 1, "final_val_err": 0.5, "epochs_run": 2}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    rundir.append_metrics(run, [{"type": "epoch", "epoch": 1, "step": 1, "val_err": 0.4},
                                {"type": "epoch", "epoch": 2, "step": 2, "val_err": 0.5}])  # fmt: skip
    rep = analysis.build_report([run], tmp_path / "out")
    (row,) = rep["runs"]
    assert row["selected_on"] == "test"
    assert (row["test_err_at_best"], row["final_test_err"]) == (0.4, 0.5)


def test_cases_of_one_variant_are_separate_lines(tmp_path):
    """Two recipe cases (multiplier 1 and 0.1) of one variant: two labelled lines, in the
    variant order, plain first."""
    from surgeon.analysis.report import _by_variant, line_label
    from surgeon.analysis.runs import load_runs

    root = tmp_path / "q"
    for tag in ("m1", "m0.1"):
        run = write_run(root, "shift-layer+scale-layer", 0.04, 0, [0.6, 0.5])
        config = json.loads((run / "config.json").read_text())
        config.update(tag=tag, name=f"{run.name}_{tag}")
        (run / "config.json").write_text(json.dumps(config))
        run.rename(root / f"{run.name}_{tag}")
    write_run(root, "plain", 0.04, 0, [0.7, 0.6])
    runs = load_runs([root])
    assert {line_label(r) for r in runs} == {
        "plain", "shift-layer+scale-layer [m0.1]", "shift-layer+scale-layer [m1]",
    }  # fmt: skip
    assert list(_by_variant(runs)) == [
        "plain", "shift-layer+scale-layer [m0.1]", "shift-layer+scale-layer [m1]",
    ]  # fmt: skip
    from surgeon.analysis.report import build_report

    assert build_report([root], tmp_path / "out")["figures"]
