"""Ablation families, dry-run figures against the paper, the runner's reuse of results, reports, CLI."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import cvt
from cvt.ablation import (
    FAMILIES,
    AblationRow,
    PaperFigures,
    Variant,
    ablation_variants,
    build_variant,
    dry_run,
    run_ablation,
)
from cvt.ablation.report import write_report
from cvt.ablation.training import (
    ABLATION_DEFAULTS,
    ablation_dir,
    check_data,
    class_count,
    train_ablation,
    variant_config,
    variant_slug,
)
from cvt.cli.main import main
from cvt.complexity import count_gmacs
from cvt.data import datasets


def _tiny_stages() -> tuple[cvt.StageSpec, ...]:
    with torch.device("meta"):
        return cvt.create_model("cvt_tiny").stage_specs


@pytest.mark.slow
def test_cvt13_dry_run_matches_paper_tables_6_and_7() -> None:
    rows = dry_run("cvt_13", ["token_embed", "kv_stride"], img_size=224, num_classes=1000)
    checked = 0
    for row in rows:
        if row.paper.params_m is not None:
            assert row.params / 1e6 == pytest.approx(row.paper.params_m, rel=0.02), row.variant
            checked += 1
        if row.paper.gflops is not None:
            assert row.gmacs == pytest.approx(row.paper.gflops, rel=0.02), row.variant
            checked += 1
    assert checked == 6  # 4 parameter counts (Table 6) and 2 GFLOP counts (Table 7)
    by_name = {(r.family, r.variant): r for r in rows}
    # the squeezed (stride-2) key/value projection saves ~30% of the compute at equal size
    s1, s2 = by_name["kv_stride", "stride 1"], by_name["kv_stride", "stride 2"]
    assert s1.params == s2.params == 19_997_480
    assert 1 - s2.gmacs / s1.gmacs == pytest.approx(1 - 4.53 / 6.55, abs=0.02)


def test_families_cover_the_papers_tables_in_order() -> None:
    variants = ablation_variants(_tiny_stages())
    assert list(dict.fromkeys(v.family for v in variants)) == list(FAMILIES)
    names = {f: [v.name for v in variants if v.family == f] for f in FAMILIES}
    assert names["pos_embed"] == ["none", "first stage", "last stage", "every stage"]
    assert names["conv_proj"] == ["none", "stage 1", "stages 1-2", "all stages"]
    assert [v.paper.top1 for v in variants if v.family == "conv_proj"] == [80.6, 80.8, 81.0, 81.6]
    assert [v.paper.params_m for v in variants if v.family == "token_embed"] == [19.5, 19.9, 20.3, 20.0]


def test_variant_overrides_build_the_intended_stages() -> None:
    variants = {(v.family, v.name): v for v in ablation_variants(_tiny_stages())}
    specs = build_variant("cvt_tiny", variants["pos_embed", "last stage"]).stage_specs
    assert [s.pos_embed for s in specs] == [False, False, True]
    specs = build_variant("cvt_tiny", variants["conv_proj", "stage 1"]).stage_specs
    assert [s.method for s in specs] == ["dw_bn", "linear", "linear"]
    linear = build_variant("cvt_tiny", variants["token_embed", "linear, no PE"])
    assert [(s.patch_size, s.patch_stride, s.patch_padding) for s in linear.stage_specs] == [(2, 2, 0)] * 3
    conv = build_variant("cvt_tiny", variants["token_embed", "conv, no PE"])
    # at 32 (a multiple of every stride) non-overlapping patches keep the token grids: only the
    # embedding's receptive field changes
    x = torch.randn(1, 3, 32, 32)
    assert [m.shape for m in linear.forward_intermediates(x, intermediates_only=True)] == [
        m.shape for m in conv.forward_intermediates(x, intermediates_only=True)
    ]
    assert linear.stage0.patch_embed.proj.weight.shape == (32, 3, 2, 2)


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(
        cvt.UsageError, match=r"unknown ablation family 'kv_strid' \(did you mean 'kv_stride'\?\)"
    ):
        ablation_variants(_tiny_stages(), ["kv_strid"])


def test_dry_run_measures_each_variant() -> None:
    rows = dry_run("cvt_tiny", ["kv_stride", "proj_method"])
    by_name = {(r.family, r.variant): r for r in rows}
    assert by_name["kv_stride", "stride 2"].params == by_name["proj_method", "dw_bn"].params == 566_218
    assert by_name["kv_stride", "stride 1"].gmacs > by_name["kv_stride", "stride 2"].gmacs
    # per block, dw_bn adds a 3x3 depthwise conv (9c) and a BatchNorm (2c) for each of q, k and v;
    # avg pooling (k, v) and the linear query add nothing. Blocks per stage: 1, 1, 2.
    dw_bn_weights = sum(blocks * 3 * (9 * c + 2 * c) for c, blocks in ((32, 1), (64, 1), (128, 2)))
    assert by_name["proj_method", "dw_bn"].params - by_name["proj_method", "linear"].params == dw_bn_weights
    assert by_name["proj_method", "avg"].params == by_name["proj_method", "linear"].params


def test_run_ablation_trains_each_distinct_model_once() -> None:
    calls: list[dict] = []

    def fake_train(variant: Variant) -> dict[str, float]:
        calls.append(variant.overrides)
        return {"top1": 50.0 + len(calls), "train_seconds": 1.0}

    rows = run_ablation("cvt_tiny", ["kv_stride", "proj_method"], fake_train, num_classes=10)
    assert len(rows) == 5 and len(calls) == 4  # "stride 2" and "dw_bn" are the same model
    by_name = {(r.family, r.variant): r for r in rows}
    assert by_name["kv_stride", "stride 2"].top1 == by_name["proj_method", "dw_bn"].top1 == 52.0
    assert calls[0] == {"stride_kv": 1}


def test_report_files_hold_the_rows(tmp_path) -> None:
    rows = [
        AblationRow(
            "kv_stride", "stride 1", 1_000_000, 0.25, PaperFigures(gflops=6.55, top1=82.3), 91.5, 12.0
        ),
        AblationRow(
            "kv_stride", "stride 2", 1_000_000, 0.125, PaperFigures(gflops=4.53, top1=81.6), 90.0, 10.0
        ),
    ]
    md, csv_path, png = write_report(rows, tmp_path / "out", "test")
    assert "| kv_stride | stride 1 | 1.000M | 0.25  | 91.5    | 12 " in md.read_text()
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], float(r["top1"]), r["paper_params_m"]) for r in table] == [
        ("stride 1", 91.5, ""), ("stride 2", 90.0, ""),
    ]  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_labels_a_diverged_variant_inside_its_axes(tmp_path, monkeypatch) -> None:
    """A diverged row has no top-1; its "diverged (step N)" label must sit where the axis starts (a
    zero-width bar at 0 put it left of the axis, and matplotlib drew no label there)."""
    import matplotlib.figure

    from cvt.ablation.report import plot_top1

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    rows = [
        AblationRow("kv_stride", "stride 1", 1, 0.25, PaperFigures(), 90.0, 12.0),
        AblationRow("kv_stride", "stride 2", 1, 0.125, PaperFigures(), None, 3.0, diverged_step=12),
    ]
    plot_top1(rows, tmp_path / "a.png", "test")
    (ax,) = drawn[0].axes
    left, right = ax.get_xlim()
    labels = {t.get_text(): t.xy[0] for t in ax.texts}
    assert left == 80.0 and labels["90.0"] == 90.0
    assert left <= labels["diverged (step 12)"] <= right


def test_cli_dry_run_json(capsys) -> None:
    assert main(["ablate", "--dry-run", "--family", "kv_stride", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["family"], r["variant"], r["paper_gflops"]) for r in rows] == [
        ("kv_stride", "stride 1", 6.55), ("kv_stride", "stride 2", 4.53),
    ]  # fmt: skip
    # the default model, stride 2, counted directly: cvt_tiny as registered
    with torch.device("meta"):
        tiny = cvt.create_model("cvt_tiny")
    assert rows[1]["params"] == cvt.count_params(tiny) and rows[1]["gmacs"] == pytest.approx(
        count_gmacs(tiny, (32, 32))
    )


def test_cli_unknown_family_exits_2(capsys) -> None:
    assert main(["ablate", "--dry-run", "--family", "nope"]) == 2
    assert "unknown ablation family 'nope'" in capsys.readouterr().err


def test_too_small_data_and_existing_report_fail_before_training(tmp_path) -> None:
    budget = replace(ABLATION_DEFAULTS, train_subset=10, batch_size=64, output=str(tmp_path / "a"))
    with pytest.raises(cvt.DataError, match="has 10 image\\(s\\), fewer than one batch of 64"):
        train_ablation(budget, ["kv_stride"])
    assert check_data(replace(budget, batch_size=8)) is None  # a check: the class count is class_count's
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ablation.csv").write_text("mine")
    with pytest.raises(cvt.UsageError) as refused:
        train_ablation(replace(ABLATION_DEFAULTS, output=str(tmp_path / "b")), ["kv_stride"])
    assert str(refused.value) == (
        f"refusing to overwrite {tmp_path / 'b' / 'ablation.csv'}: choose another --output or pass "
        f"--overwrite"
    )
    assert (tmp_path / "b" / "ablation.csv").read_text() == "mine"


def test_cli_refuses_an_earlier_report_with_exit_2(tmp_path, capsys) -> None:
    out = tmp_path / "ablation"
    out.mkdir()
    (out / "ablation.md").write_text("mine")
    assert main(["ablate", "--family", "kv_stride", "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"cvt ablate: error: refusing to overwrite {out / 'ablation.md'}: choose another --output or pass "
        f"--overwrite\n"
    )
    assert (out / "ablation.md").read_text() == "mine"


def test_download_flag_reaches_the_data_check(tmp_path, monkeypatch) -> None:
    # `cvt ablate --download` fetches a missing CIFAR archive as `cvt train` does, instead of asking for it
    fetched: list[tuple[str, Path]] = []

    def fake_download(name: str, root: Path) -> None:
        fetched.append((name, root))
        raise cvt.DataError("no network in tests")

    monkeypatch.setattr(datasets, "_download_cifar", fake_download)
    budget = replace(ABLATION_DEFAULTS, dataset="cifar10", data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(cvt.DataError, match="no network in tests"):
        check_data(budget)
    assert fetched == [("cifar10", tmp_path / "data")]
    with pytest.raises(cvt.DataError, match="pass --download"):  # without the flag: the hint
        check_data(replace(budget, download=False))


def test_variant_config_adds_the_overrides_to_the_budget(tmp_path) -> None:
    budget = replace(ABLATION_DEFAULTS, model_args={"drop_path_rate": 0.0})
    variant = ablation_variants(_tiny_stages(), ["conv_proj"])[1]
    cfg = variant_config(budget, variant, tmp_path / variant_slug(variant))
    assert cfg.model_args == {"drop_path_rate": 0.0, "method": ["dw_bn", "linear", "linear"]}
    assert cfg.output == str(tmp_path / "conv_proj-stage_1") and cfg.epochs == budget.epochs


@pytest.mark.slow
def test_cli_trains_each_variant_and_writes_the_report(tmp_path, capsys) -> None:
    out = tmp_path / "ablation"
    args = ["ablate", "--family", "kv_stride", "--epochs", "1", "--train-subset", "64", "--batch-size", "32"]
    args += ["--img-size", "16"]  # 8/4/2 token grids: a quarter of the cost of 32x32
    assert main([*args, "--output", str(out)]) == 0
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["stride 1", "stride 2"]
    for row in rows:
        assert 0.0 <= float(row["top1"]) <= 100.0 and float(row["train_seconds"]) > 0
        run = out / f"kv_stride-{row['variant'].replace(' ', '_')}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_top1"] == pytest.approx(float(row["top1"]))
    assert (out / "ablation.png").stat().st_size > 0
    assert "| kv_stride | stride 1 |" in capsys.readouterr().out


def test_model_args_are_part_of_every_variant_measured_and_deduplicated() -> None:
    """``--model-args method=avg``: rows measure the avg models, and only variants that are equal
    with it share a training (kv stride 2 is the avg baseline, no longer the dw_bn one)."""
    avg = {"method": "avg"}
    by_name = {
        (r.family, r.variant): r for r in dry_run("cvt_tiny", ["kv_stride", "proj_method"], model_args=avg)
    }
    dw_bn_weights = sum(blocks * 3 * (9 * c + 2 * c) for c, blocks in ((32, 1), (64, 1), (128, 2)))
    assert (
        by_name["kv_stride", "stride 2"].params
        == by_name["proj_method", "avg"].params
        == 566_218 - dw_bn_weights
    )
    assert by_name["proj_method", "dw_bn"].params == 566_218  # a variant's override wins over model_args
    assert by_name["kv_stride", "stride 2"].gmacs == by_name["proj_method", "avg"].gmacs

    calls: list[dict] = []

    def fake_train(variant: Variant) -> dict[str, float]:
        calls.append(variant.overrides)
        return {"top1": 50.0 + len(calls), "train_seconds": 1.0}

    rows = run_ablation("cvt_tiny", ["kv_stride", "proj_method"], fake_train, 10, model_args=avg)
    assert calls == [{"stride_kv": 1}, {"stride_kv": 2}, {"method": "dw_bn"}, {"method": "linear"}]
    top1 = {(r.family, r.variant): r.top1 for r in rows}
    assert top1["proj_method", "avg"] == top1["kv_stride", "stride 2"] == 52.0
    assert top1["proj_method", "dw_bn"] == 53.0


def test_variants_differing_only_in_what_their_projection_ignores_train_once() -> None:
    """Under ``method=linear`` (no conv) the k/v stride builds nothing: kv_stride's two variants and
    proj_method's linear one are one model, trained once (they were trained twice, as two models)."""
    calls: list[dict] = []

    def fake_train(variant: Variant) -> dict[str, float]:
        calls.append(variant.overrides)
        return {"top1": 50.0 + len(calls), "train_seconds": 1.0}

    linear = {"method": "linear"}
    rows = run_ablation("cvt_tiny", ["kv_stride", "proj_method"], fake_train, 10, model_args=linear)
    assert calls == [{"stride_kv": 1}, {"method": "dw_bn"}, {"method": "avg"}]
    top1 = {(r.family, r.variant): r.top1 for r in rows}
    shared = (top1["kv_stride", "stride 1"], top1["kv_stride", "stride 2"], top1["proj_method", "linear"])
    assert shared == (51.0, 51.0, 51.0)


def test_a_model_shared_by_families_trains_as_the_first_variant_in_the_papers_order() -> None:
    """The baseline of pos_embed and kv_stride trains (and keeps its run folder) as pos_embed's,
    whatever order the families are given in: --resume auto with another order retrained it."""
    for families in (["kv_stride", "pos_embed"], ["pos_embed", "kv_stride"]):
        names: list[str] = []

        def fake_train(variant: Variant, names: list[str] = names) -> dict[str, float]:
            names.append(f"{variant.family}/{variant.name}")
            return {"top1": 50.0, "train_seconds": 1.0}

        run_ablation("cvt_tiny", families, fake_train, 10)
        pos_embed = [f"pos_embed/{n}" for n in ("none", "first stage", "last stage", "every stage")]
        assert sorted(names) == sorted(["kv_stride/stride 1", *pos_embed]), families  # none: the baseline


def test_cli_dry_run_counts_the_model_args(capsys) -> None:
    assert main(["ablate", "--dry-run", "--family", "kv_stride", "--model-args", "method=avg", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["params"] for r in rows] == [554_602, 554_602]  # 566_218 less the dw_bn weights


def test_every_variant_folder_is_checked_before_the_first_trains(tmp_path, monkeypatch) -> None:
    trained: list[str] = []
    monkeypatch.setattr(
        "cvt.ablation.training.train_variant",
        lambda cfg: trained.append(cfg.output) or {"top1": 90.0, "train_seconds": 1.0},
    )
    out = tmp_path / "ablation"
    (out / "kv_stride-stride_2").mkdir(parents=True)
    (out / "kv_stride-stride_2" / "metrics.csv").write_text("an earlier run")
    budget = replace(ABLATION_DEFAULTS, output=str(out))
    with pytest.raises(cvt.UsageError, match="kv_stride-stride_2 already have content: pass --resume auto"):
        train_ablation(budget, ["kv_stride"], verbose=False)
    assert trained == [] and sorted(p.name for p in out.iterdir()) == ["kv_stride-stride_2"]
    rows, _ = train_ablation(replace(budget, overwrite=True), ["kv_stride"], verbose=False)
    assert trained == [str(out / "kv_stride-stride_1"), str(out / "kv_stride-stride_2")] and len(rows) == 2

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "kv_stride-stride_1").write_text("a file")
    with pytest.raises(cvt.UsageError, match="kv_stride-stride_1: not a folder"):
        train_ablation(replace(budget, output=str(tmp_path / "b"), overwrite=True), ["kv_stride"])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--resume", "last.pt"], "cvt ablate --resume takes auto only (got 'last.pt')"),
        (["--name", "mine"], "--name does not apply to cvt ablate: each variant's run folder is named"),
        (["--finetune", "best.pt"], "--finetune does not apply to cvt ablate: the variants change the arch"),
        (["--pretrained"], "--pretrained does not apply to cvt ablate: the variants change the arch"),
        (["--json"], "--json needs --dry-run"),
    ],
)
def test_cli_refuses_options_it_would_ignore(argv, fragment, tmp_path, capsys) -> None:
    out = tmp_path / "ablation"
    assert main(["ablate", "--family", "kv_stride", "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvt ablate: error: ") and fragment in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_torchrun_before_any_rank_locks_the_folder(tmp_path, capsys, monkeypatch) -> None:
    """Under torchrun every rank took the ablation folder's lock, so rank 1 refused rank 0's run as "in
    use by another cvt ablate" and torchrun killed both; --dry-run trains nothing and still works."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "ablation"
    assert main(["ablate", "--family", "kv_stride", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not under torchrun (WORLD_SIZE=2)" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["ablate", "--family", "kv_stride", "--dry-run", "--num-classes", "10"]) == 0


def test_help_leaves_out_the_train_options_it_refuses(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    shown = capsys.readouterr().out
    assert "--epochs" in shown and "--overwrite" in shown  # the budget's options are listed
    assert "--name" not in shown and "--resume" in shown  # --resume auto continues an interrupted one
    assert "--finetune" not in shown and "pretrained" not in shown


def test_model_args_are_checked_at_the_img_size(capsys) -> None:
    """4x4 patches need 64 px; at the default 32 the base with these model_args does not build."""
    patches = {"patch_stride": 4, "patch_size": 4, "patch_padding": 0}
    argv = ["ablate", "--dry-run", "--family", "kv_stride", "--img-size", "64", "--json", "--model-args"]
    assert main([*argv, *(f"{k}={v}" for k, v in patches.items())]) == 0
    rows = json.loads(capsys.readouterr().out)
    stride_2 = ablation_variants(_tiny_stages(), ["kv_stride"])[1]
    with torch.device("meta"):
        model = build_variant("cvt_tiny", stride_2, 10, 64, patches)
    assert rows[1]["params"] == cvt.count_params(model) and len(rows) == 2

    def fake_train(variant: Variant) -> dict[str, float]:
        return {"top1": 50.0, "train_seconds": 1.0}

    trained = run_ablation("cvt_tiny", ["kv_stride"], fake_train, 10, img_size=64, model_args=patches)
    assert [r.top1 for r in trained] == [50.0, 50.0]


def test_dry_run_counts_the_head_training_gives(tmp_path, capsys) -> None:
    """Without --num-classes the head has the data set's class count, as in training."""
    head = 128 + 1  # cvt_tiny's head: 128 features and a bias per class

    def params(*options: str) -> int:
        assert main(["ablate", "--dry-run", "--family", "kv_stride", "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)[1]["params"]

    assert params() == 566_218  # cvt_tiny's own default is digits' 10 classes
    assert params("--dataset", "cifar100") == 566_218 + 90 * head  # no CIFAR files needed
    for name in ("a", "b", "c", ".hidden"):
        (tmp_path / "train" / name).mkdir(parents=True)
    folder = ["--dataset", "imagefolder", "--data-dir", str(tmp_path)]
    assert params(*folder) == 566_218 - 7 * head  # 3 class folders
    assert params(*folder, "--num-classes", "5") == 566_218 - 5 * head
    with pytest.warns(UserWarning, match=r"no class folders in .*nowhere.train: counted cvt_tiny with its "
                      r"default head of 10 classes"):  # fmt: skip
        assert params("--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere")) == 566_218
    assert main(["ablate", "--dry-run", "--dataset", "mnist"]) == 2
    assert "dataset must be one of digits, cifar10, cifar100, imagefolder" in capsys.readouterr().err

    from cvt.data import build_dataset
    from cvt.data.datasets import FIXED_CLASS_COUNTS

    assert len(build_dataset("digits", None, "train").classes) == FIXED_CLASS_COUNTS["digits"] == 10


def test_starting_weights_are_refused_from_a_recipe_too(tmp_path) -> None:
    out = tmp_path / "ablation"
    for weights in ({"finetune": "best.pt"}, {"pretrained": True}):
        budget = replace(ABLATION_DEFAULTS, output=str(out), **weights)
        with pytest.raises(cvt.UsageError, match="do not apply to an ablation: its variants change the arch"):
            train_ablation(budget, ["kv_stride"], verbose=False)
    assert not out.exists()


def test_an_overwrite_run_leaves_no_report_of_the_runs_it_replaces(tmp_path, monkeypatch) -> None:
    out = tmp_path / "ablation"
    out.mkdir()
    for name in ("ablation.md", "ablation.csv", "ablation.png"):
        (out / name).write_text("the earlier ablation")
    budget = replace(ABLATION_DEFAULTS, output=str(out), overwrite=True)
    with pytest.raises(cvt.UsageError, match="unknown ablation family"):  # a check fails: nothing touched
        train_ablation(budget, ["kv_strid"], verbose=False)
    assert (out / "ablation.md").read_text() == "the earlier ablation"

    def fail(cfg) -> dict[str, float]:
        raise cvt.DataError("the data went away")

    monkeypatch.setattr("cvt.ablation.training.train_variant", fail)
    with pytest.raises(cvt.DataError, match="the data went away"):
        train_ablation(budget, ["kv_stride"], verbose=False)
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_diverging_variant_is_a_row_and_the_others_still_train(tmp_path, monkeypatch, capsys) -> None:
    from cvt.engine import NonFiniteLossError

    def fake_train(cfg, resume=None) -> dict:
        if cfg.model_args["stride_kv"] == 1:
            raise NonFiniteLossError("non-finite loss (nan) at step 7 (epoch 1, batch 7); lower --lr", step=7)
        return {"final_top1": 90.0, "train_seconds": 2.0}

    monkeypatch.setattr("cvt.engine.train", fake_train)
    out = tmp_path / "ablation"
    with pytest.warns(
        UserWarning, match=r"1 variant\(s\) diverged \(non-finite loss\): kv_stride / stride 1"
    ):
        assert main(["ablate", "--family", "kv_stride", "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "ablation kv_stride / stride 1: diverged (step 7) in 0 s" in shown
    assert "| kv_stride | stride 1 | 0.566M | 0.02087 | diverged (step 7) |" in shown
    assert "| diverged (step 7) |" in (out / "ablation.md").read_text()
    with open(out / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["top1"], r["diverged_step"]) for r in table] == [("", "7"), ("90.0", "")]
    assert (out / "ablation.png").stat().st_size > 0

    def data_error(cfg, resume=None) -> dict:  # any other error still stops the ablation
        raise cvt.DataError("unreadable image")

    monkeypatch.setattr("cvt.engine.train", data_error)
    with pytest.raises(cvt.DataError, match="unreadable image"):
        train_ablation(replace(ABLATION_DEFAULTS, output=str(tmp_path / "b")), ["kv_stride"], verbose=False)


def test_train_variant_gives_the_step_a_real_run_diverged_at(tmp_path) -> None:
    from cvt.ablation.training import train_variant

    budget = replace(
        ABLATION_DEFAULTS, epochs=1, train_subset=64, batch_size=32, img_size=16, lr=1e8, sched="constant",
        warmup_epochs=0.0, output=str(tmp_path / "run"), device="cpu",
    )  # fmt: skip
    result = train_variant(budget)
    assert result["diverged_step"] == 1 and "top1" not in result and result["train_seconds"] > 0


def test_cli_family_can_be_repeated(capsys) -> None:
    assert main(["ablate", "--dry-run", "--family", "pos_embed", "--family", "kv_stride", "--json"]) == 0
    families = [r["family"] for r in json.loads(capsys.readouterr().out)]
    assert families == ["pos_embed"] * 4 + ["kv_stride"] * 2


def test_help_shows_the_defaults_of_an_ablation(capsys) -> None:
    from cvt.engine.config import field_help

    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "passes over the training set (default: 3)" in shown
    assert "linear warm-up from warmup_lr (per step) (default: 0.25)" in shown
    assert "default: runs/ablate-<model>-<dataset>" in shown
    assert "(default: 30)" not in shown and "runs/<name>" not in shown
    assert field_help("epochs") == "passes over the training set (default: 30)"  # cvt train's


def test_variants_with_other_token_grids_are_warned() -> None:
    with pytest.warns(UserWarning) as caught:
        dry_run("cvt_tiny", ["token_embed"], img_size=28)  # 7 is odd: the stride-2 linear embedding gives 3
    assert [str(w.message).split(":")[0] for w in caught] == [
        "token_embed / linear, no PE", "token_embed / linear + PE",
    ]  # fmt: skip
    assert "token grids 14x14/7x7/3x3 differ from the base model's 14x14/7x7/4x4 at img_size 28x28" in str(
        caught[0].message
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dry_run("cvt_tiny", ["token_embed"], img_size=32)  # a multiple of every stride: the same grids


def test_paper_figures_are_given_for_a_three_stage_base_only() -> None:
    """The paper's Table 8 is CvT-13's (3 stages): a base of another depth gets no paper column."""
    two, four = _tiny_stages()[:2], (*_tiny_stages(), _tiny_stages()[-1])
    for stages, names in (
        (two, ["none", "stage 1", "all stages"]),
        (four, ["none", "stage 1", "stages 1-2", "stages 1-3", "all stages"]),
    ):
        variants = ablation_variants(stages, ["conv_proj"])
        assert [v.name for v in variants] == names
        assert [v.paper.top1 for v in variants] == [None] * len(names)


def test_a_family_named_twice_is_run_once() -> None:
    variants = ablation_variants(_tiny_stages(), ["kv_stride", "pos_embed", "kv_stride"])
    assert [(v.family, v.name) for v in variants] == [
        ("kv_stride", "stride 1"), ("kv_stride", "stride 2"),
        ("pos_embed", "none"), ("pos_embed", "first stage"), ("pos_embed", "last stage"),
        ("pos_embed", "every stage"),
    ]  # fmt: skip


def test_empty_family_list_is_refused() -> None:
    with pytest.raises(cvt.UsageError, match="no ablation family given"):
        ablation_variants(_tiny_stages(), [])
    with pytest.raises(cvt.UsageError, match="no ablation family given"):
        dry_run("cvt_tiny", families=[])
    assert len(ablation_variants(_tiny_stages(), None)) == 17


@pytest.mark.slow
def test_docs_show_what_the_dry_run_prints(capsys) -> None:
    """docs/ablations.md's CvT-13 table is the command's output, and its count of the families that
    hold the baseline is right."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "ablations.md").read_text()
    command = "cvt ablate --dry-run --model cvt_13 --img-size 224 --num-classes 1000"
    assert f"`{command}`" in doc
    assert main(command.split()[1:]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed in doc
    stages = _tiny_stages()
    holding = {
        v.family for v in ablation_variants(stages) if build_variant("cvt_tiny", v).stage_specs == stages
    }
    assert len(holding) == 5 and "the baseline appears in five families" in " ".join(doc.split())


def test_the_plot_lists_variants_top_down_by_family_from_zero(tmp_path, monkeypatch) -> None:
    """Bars in table order from the top, labelled ``family: variant``, one colour per family, the title
    given, at 120 dpi; an axis that would start below 0 (a top-1 under 10%) starts at 0."""
    import matplotlib.figure

    from cvt.ablation.report import plot_top1

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append((fig, k)))
    rows = [
        AblationRow("pos_embed", "none", 1, 0.1, PaperFigures(), 6.0, 1.0),
        AblationRow("pos_embed", "every stage", 1, 0.1, PaperFigures(), 8.0, 1.0),
        AblationRow("kv_stride", "stride 1", 1, 0.1, PaperFigures(), 7.5, 1.0),
    ]
    plot_top1(rows, tmp_path / "a.png", "digits ablation")
    [(fig, saved)] = drawn
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.0, 100.0) and saved["dpi"] == 120
    assert ax.yaxis_inverted()  # the first row on top, as in the table
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "pos_embed: none", "pos_embed: every stage", "kv_stride: stride 1",
    ]  # fmt: skip
    bars = ax.patches
    assert [b.get_width() for b in bars] == [6.0, 8.0, 7.5]
    colours = [b.get_facecolor() for b in bars]
    assert colours[0] == colours[1] != colours[2]
    assert ax.get_title() == "digits ablation"


def test_the_report_and_the_command_name_the_budget(tmp_path, monkeypatch, capsys) -> None:
    """ablation.md starts with the budget as its title; the command says each variant's top-1 as it
    finishes and, at the end, the files it wrote."""
    monkeypatch.setattr(
        "cvt.ablation.training.train_variant",
        lambda cfg: {"top1": 90.0 + cfg.model_args["stride_kv"], "train_seconds": 4.0},
    )
    out = tmp_path / "ablation"
    argv = ["ablate", "--family", "kv_stride", "--output", str(out), "--epochs", "2", "--batch-size", "16"]
    assert main([*argv, "--lr", "0.01", "--seed", "3"]) == 0
    title = "cvt_tiny on digits: 2 epoch(s) per variant, batch 16, lr 0.01, seed 3"
    assert (out / "ablation.md").read_text().splitlines()[0] == f"# {title}"
    shown = capsys.readouterr().out
    assert "ablation kv_stride / stride 1: top-1 91.00% in 4 s\n" in shown
    assert "ablation kv_stride / stride 2: top-1 92.00% in 4 s\n" in shown
    assert shown.endswith(f"wrote {out / 'ablation.md'}, {out / 'ablation.csv'}, {out / 'ablation.png'}\n")


def test_resume_auto_keeps_finished_variants_and_writes_the_report_again(
    tmp_path, monkeypatch, capsys
) -> None:
    """``resume="auto"``: a variant whose summary.json reads is kept with its top-1 (not trained again),
    one whose summary cannot be read trains, options that may change (the output) may differ, the
    earlier report is replaced, and a folder without a config.yaml is refused before anything trains."""
    trained: list[str] = []
    monkeypatch.setattr(
        "cvt.ablation.training.train_variant",
        lambda cfg: trained.append(cfg.output) or {"top1": 90.0, "train_seconds": 1.0},
    )
    out = tmp_path / "ablation"
    first, second = out / "kv_stride-stride_1", out / "kv_stride-stride_2"
    first.mkdir(parents=True)
    second.mkdir()
    (first / "config.yaml").write_text(f"model: cvt_tiny\noutput: {tmp_path / 'elsewhere'}\n")
    (first / "summary.json").write_text(json.dumps({"final_top1": 77.0, "train_seconds": 5.0}))
    (second / "config.yaml").write_text("model: cvt_tiny\n")
    (second / "summary.json").write_text('{"final_top1": ')  # cut short: that run did not finish
    for name in ("ablation.md", "ablation.csv", "ablation.png"):
        (out / name).write_text("the earlier report")
    budget = replace(ABLATION_DEFAULTS, output=str(out), resume="auto")
    rows, paths = train_ablation(budget, ["kv_stride"], verbose=False)
    assert trained == [str(second)]
    assert [(r.variant, r.top1, r.train_seconds) for r in rows] == [
        ("stride 1", 77.0, 5.0),
        ("stride 2", 90.0, 1.0),
    ]
    with open(out / "ablation.csv") as f:
        assert [r["top1"] for r in csv.DictReader(f)] == ["77.0", "90.0"]
    assert paths == [out / "ablation.md", out / "ablation.csv", out / "ablation.png"]
    assert capsys.readouterr().out == ""  # verbose=False: nothing printed

    other = tmp_path / "b"
    (other / "kv_stride-stride_1").mkdir(parents=True)
    (other / "kv_stride-stride_1" / "metrics.csv").write_text("someone's run")
    with pytest.raises(
        cvt.UsageError, match="holds no variant's run \\(no readable config.yaml\\) to resume"
    ):
        train_ablation(replace(budget, output=str(other)), ["kv_stride"], verbose=False)
    assert trained == [str(second)]


def test_a_resumed_run_with_fewer_families_continues_a_shared_models_run(
    tmp_path, monkeypatch, capsys
) -> None:
    """A run of pos_embed and kv_stride trained the baseline in ``pos_embed-none``; resumed with
    kv_stride alone, its stride 2 (the baseline) keeps that run instead of training it again in a
    folder of its own, and its row says whose run it is; without --resume the folder is its own."""
    trained: list[str] = []
    monkeypatch.setattr(
        "cvt.ablation.training.train_variant",
        lambda cfg: trained.append(Path(cfg.output).name) or {"top1": 90.0, "train_seconds": 1.0},
    )
    out = tmp_path / "ablation"
    baseline = out / "pos_embed-none"
    baseline.mkdir(parents=True)
    (baseline / "config.yaml").write_text("model: cvt_tiny\n")
    (baseline / "summary.json").write_text(json.dumps({"final_top1": 77.0, "train_seconds": 5.0}))
    budget = replace(ABLATION_DEFAULTS, output=str(out), resume="auto")
    rows, _ = train_ablation(budget, ["kv_stride"], verbose=True)
    assert trained == ["kv_stride-stride_1"]
    assert [(r.variant, r.top1, r.trained_as) for r in rows] == [
        ("stride 1", 90.0, None),
        ("stride 2", 77.0, "pos_embed / none"),
    ]
    assert not (out / "kv_stride-stride_2").exists()
    assert "ablation kv_stride / stride 2: top-1 77.00% in 5 s (the same model as pos_embed / none" in (
        capsys.readouterr().out
    )
    with open(out / "ablation.csv") as f:
        assert [r["trained_as"] for r in csv.DictReader(f)] == ["", "pos_embed / none"]

    fresh = replace(budget, output=str(tmp_path / "fresh"), resume=None)
    rows, _ = train_ablation(fresh, ["kv_stride"], verbose=False)  # nothing to continue: its own folders
    assert trained[1:] == ["kv_stride-stride_1", "kv_stride-stride_2"]
    assert [r.trained_as for r in rows] == [None, None]


def test_choose_run_is_offered_only_the_variants_of_the_same_model() -> None:
    """``choose_run`` gets a model's first chosen variant and the other variants of every family that
    build it, in the paper's order; what it returns is what trains, and the row names it."""
    names: list[str] = []
    offered: dict[str, list[str]] = {}

    def fake_train(variant: Variant) -> dict[str, float]:
        names.append(variant.label)
        return {"top1": 50.0, "train_seconds": 1.0}

    def choose_run(first: Variant, others: list[Variant]) -> Variant:
        offered[first.label] = [v.label for v in others]
        return others[-1] if others else first

    rows = run_ablation("cvt_tiny", ["kv_stride"], fake_train, 10, choose_run=choose_run)
    baseline = [
        "pos_embed / none",
        "token_embed / conv, no PE",
        "conv_proj / all stages",
        "proj_method / dw_bn",
    ]
    assert offered == {"kv_stride / stride 1": [], "kv_stride / stride 2": baseline}
    assert names == ["kv_stride / stride 1", "proj_method / dw_bn"]
    assert [r.trained_as for r in rows] == [None, "proj_method / dw_bn"]


def _baseline_run(out: Path, epochs: int) -> None:
    """A finished run of the baseline as pos_embed / none trained it in ``out``, as its config.yaml
    records it (digits: 10 classes; cvt_tiny: 32 px)."""
    variant = ablation_variants(_tiny_stages(), ["pos_embed"])[0]
    folder = out / variant_slug(variant)
    config = variant_config(replace(ABLATION_DEFAULTS, epochs=epochs), variant, folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        yaml.safe_dump({**config.recorded(), "num_classes": 10, "img_size": 32})
    )
    (folder / "summary.json").write_text(json.dumps({"final_top1": 77.0, "train_seconds": 5.0}))


def test_a_resumed_run_continues_another_familys_run_only_with_its_budget(tmp_path, monkeypatch) -> None:
    """The baseline's run in ``pos_embed-none`` continues only if it was trained with this budget (a
    1-epoch run is no row of a 3-epoch ablation: kv_stride's own folder trains), and only while the
    model's own folder is empty (stray files there are refused, as without the other run)."""
    trained: list[str] = []
    monkeypatch.setattr(
        "cvt.ablation.training.train_variant",
        lambda cfg: trained.append(Path(cfg.output).name) or {"top1": 90.0, "train_seconds": 1.0},
    )
    budget = replace(ABLATION_DEFAULTS, resume="auto")
    other = tmp_path / "other_budget"
    _baseline_run(other, epochs=1)
    rows, _ = train_ablation(replace(budget, output=str(other)), ["kv_stride"], verbose=False)
    assert trained == ["kv_stride-stride_1", "kv_stride-stride_2"]
    assert [r.trained_as for r in rows] == [None, None]

    stray = tmp_path / "stray"
    _baseline_run(stray, epochs=ABLATION_DEFAULTS.epochs)
    (stray / "kv_stride-stride_2").mkdir()
    (stray / "kv_stride-stride_2" / "notes.txt").write_text("mine")
    with pytest.raises(cvt.UsageError, match="kv_stride-stride_2 holds no variant's run"):
        train_ablation(replace(budget, output=str(stray)), ["kv_stride"], verbose=False)
    assert trained == ["kv_stride-stride_1", "kv_stride-stride_2"]

    same = tmp_path / "same_budget"
    _baseline_run(same, epochs=ABLATION_DEFAULTS.epochs)
    rows, _ = train_ablation(replace(budget, output=str(same)), ["kv_stride"], verbose=False)
    assert trained[2:] == ["kv_stride-stride_1"]
    assert [(r.top1, r.trained_as) for r in rows] == [(90.0, None), (77.0, "pos_embed / none")]
    report = (same / "ablation.md").read_text()
    assert "- kv_stride / stride 2: the same model as pos_embed / none, trained once" in report


def test_a_variants_overrides_win_over_the_budgets_model_args(tmp_path) -> None:
    """``--model-args method=avg``: the proj_method variant dw_bn still trains dw_bn (as it is measured)."""
    budget = replace(ABLATION_DEFAULTS, model_args={"method": "avg", "drop_path_rate": 0.0})
    dw_bn = ablation_variants(_tiny_stages(), ["proj_method"])[0]
    cfg = variant_config(budget, dw_bn, tmp_path / variant_slug(dw_bn))
    assert cfg.model_args == {"method": "dw_bn", "drop_path_rate": 0.0}


def test_variant_folders_and_the_default_output_are_named_as_documented() -> None:
    variants = ablation_variants(_tiny_stages(), ["token_embed"])
    assert [variant_slug(v) for v in variants] == [
        "token_embed-linear_no_pe", "token_embed-linear_pe", "token_embed-conv_pe", "token_embed-conv_no_pe",
    ]  # fmt: skip
    assert ablation_dir(ABLATION_DEFAULTS) == Path("runs") / "ablate-cvt_tiny-digits"
    assert ablation_dir(replace(ABLATION_DEFAULTS, model="cvt_13", dataset="cifar10")) == Path(
        "runs/ablate-cvt_13-cifar10"
    )
    assert ablation_dir(replace(ABLATION_DEFAULTS, output="mine")) == Path("mine")


def test_the_data_check_counts_accumulated_batches() -> None:
    """With --accum-steps 4 one optimizer step takes 4 batches: 40 images cannot fill one of 4 x 16."""
    budget = replace(ABLATION_DEFAULTS, train_subset=40, batch_size=16, accum_steps=4)
    with pytest.raises(cvt.DataError, match="has 40 image\\(s\\), fewer than one batch of 64"):
        check_data(budget)
    assert check_data(replace(budget, accum_steps=2)) is None


def test_an_unreadable_class_folder_counts_the_default_head(tmp_path, monkeypatch) -> None:
    """A data folder that cannot be listed (no permission) is as good as none for counting classes."""
    from cvt.data import datasets as data_module

    def unreadable(folder):
        raise cvt.DataError(f"cannot list folder {folder}: PermissionError")

    monkeypatch.setattr(data_module, "_list_folder", unreadable)
    budget = replace(ABLATION_DEFAULTS, dataset="imagefolder", data_dir=str(tmp_path))
    with pytest.warns(
        UserWarning, match="found no class folders in .*: counted cvt_tiny with its default head"
    ):
        assert class_count(budget) == 10


def test_model_args_that_keep_the_token_grids_are_not_warned() -> None:
    """4x4 patches at 64 px give the grids 16/8/4 for the base with these model_args and every variant:
    no warning (the grids are compared with the base's model_args, not with the bare base's 32/16/8)."""
    patches = {"patch_stride": 4, "patch_size": 4, "patch_padding": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = dry_run("cvt_tiny", ["kv_stride"], img_size=64, model_args=patches)
    assert [r.variant for r in rows] == ["stride 1", "stride 2"]
