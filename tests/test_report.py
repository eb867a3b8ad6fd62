import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, run_script

from aelab.baselines import PCA, LinearDenoiser
from aelab.report import write_report

# one epoch of the tiny recipe keeps the three sweeps to seconds each
SWEEP_OVERRIDES = [*TINY, "trainer.max_epochs=1"]


def sweep(data_dir, sweep_dir, *args):
    result = run_script(
        "train.py",
        "-m",
        *SWEEP_OVERRIDES,
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


@pytest.fixture(scope="module")
def sweeps(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    grid = sweep(data_dir, root / "grid", "regularizer=lasso,dropout", "model.code_dim=4,8")
    lasso = sweep(
        data_dir,
        root / "lasso",
        "experiment=lasso_search",
        "data=mnist",
        "model.code_dim=8",
        "model.depth=3",
        "model.l1_weight=1e-6,1e-4",
    )
    denoise = sweep(
        data_dir,
        root / "denoise",
        "experiment=denoise",
        "data=mnist",
        "model.code_dim=8",
        "model.depth=3",
        "model.noise_variance=0.1,1.0",
    )
    return [grid, lasso, denoise]


def test_report_has_csv_tables_and_figures(sweeps, data_dir, tmp_path):
    # the report reads sweeps that were moved since they ran, as when copied off a cluster
    moved = [shutil.copytree(s, tmp_path / "moved" / s.name) for s in sweeps]
    # a job that died before writing its metrics must be listed, not skipped
    failed = moved[0] / "3"
    (failed / "metrics.json").unlink()
    report = write_report(moved, tmp_path / "report", str(data_dir))
    text = report.read_text()

    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert len(results) == 4 + 2 + 2
    assert (results["status"] == "failed").sum() == 1
    assert {
        "dataset",
        "depth",
        "code_dim",
        "l1_weight",
        "test/mse",
        "test/psnr_denoised_1.0",
    } <= set(results.columns)
    assert f"{failed}: no metrics.json" in text

    for heading in (
        "Best model per dataset and regularizer",
        "Full grid",
        "Lasso weight search",
        "Denoising",
    ):
        assert f"## {heading}" in text
    assert "| mnist | dropout |" in text and "| mnist | lasso |" in text
    assert "linear (Wiener) denoiser" in text and "AE trained at variance 0.1" in text
    for figure in (
        "loss_curves_mnist",
        "reconstructions_mnist",
        "psnr_vs_variance_mnist",
        "denoising_mnist",
    ):
        assert (tmp_path / "report" / f"{figure}.png").stat().st_size > 1000
        assert f"({figure}.png)" in text


def test_report_refuses_to_overwrite(sweeps, data_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(Exception, match="already holds files"):
        write_report(sweeps, out, str(data_dir))
    assert (out / "notes.md").read_text() == "mine"


def test_pca_matches_a_direct_svd():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.random((200, 30))).float()
    test = torch.from_numpy(rng.random((50, 30))).float()
    mean = train.double().mean(0).numpy()
    _, _, vt = np.linalg.svd(train.double().numpy() - mean, full_matrices=False)
    basis = vt[:5].T
    direct = (test.double().numpy() - mean) @ basis @ basis.T + mean
    ours = PCA.fit(train).reconstruct(test, 5)
    np.testing.assert_allclose(ours.numpy(), direct, atol=1e-5)


def test_linear_denoiser_matches_least_squares_regression():
    rng = np.random.default_rng(1)
    clean = torch.from_numpy(rng.random((500, 10)) * 0.5 + 0.25).float()
    noisy = clean + 0.1 * torch.from_numpy(rng.standard_normal((500, 10))).float()
    # regress clean on [noisy, 1] by least squares: the best affine estimator on the data
    design = np.hstack([noisy.double().numpy(), np.ones((500, 1))])
    coef, *_ = np.linalg.lstsq(design, clean.double().numpy(), rcond=None)
    direct = np.clip(design @ coef, 0, 1)
    ours = LinearDenoiser.fit(clean, noisy, ridge=0.0)(noisy)
    np.testing.assert_allclose(ours.numpy(), direct, atol=1e-5)


@pytest.fixture(scope="module")
def recipe_sweeps(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    mnist = ["data=mnist", "model.code_dim=4,8"]
    return [
        sweep(data_dir, root / "seed", "experiment=seed", *mnist),
        sweep(data_dir, root / "best", "experiment=best", *mnist),
        sweep(
            data_dir,
            root / "best_denoise",
            "experiment=best_denoise",
            "data=mnist",
            "model.noise_variance=0.1,1.0",
        ),
        sweep(data_dir, root / "best_ablation", "experiment=best_ablation", "ablation=relu,none"),
    ]


def test_report_sets_the_recipes_against_pca_hinton_and_the_linear_denoiser(
    recipe_sweeps, data_dir, tmp_path
):
    text = write_report(recipe_sweeps, tmp_path / "report", str(data_dir)).read_text()
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert sorted(results["sweep"].unique()) == ["best", "best_ablation", "best_denoise", "seed"]

    # the recipe runs are not mistaken for the study's grid or denoising sweep
    assert "## Full grid" not in text and "AE trained at variance" not in text
    assert "## Recipes against the classical baselines" in text
    for heading in ("Reconstruction: test MSE against PCA", "Denoising: test PSNR", "Ablation"):
        assert f"### {heading}" in text

    # one row per code size with both recipes and PCA's MSE at that size
    best = results[results["sweep"] == "best"].set_index("code_dim")["test/mse"]
    seed = results[results["sweep"] == "seed"].set_index("code_dim")["test/mse"]
    for code in (4, 8):
        row = next(line for line in text.splitlines() if line.startswith(f"| mnist | {code} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(seed[code], rel=1e-3)
        assert float(cells[3]) == pytest.approx(best[code], rel=1e-3)
        assert float(cells[4]) == pytest.approx(784 * best[code], rel=1e-3)
        assert float(cells[6]) == pytest.approx(best[code] / float(cells[5]), rel=2e-3)
    # the ablation's rows name what was taken out, against the full recipe
    assert "| none | mnist | 8 | " in text and "| relu | mnist | 8 | " in text
    # the full recipe heads the table whatever order the sweep ran in
    assert text.index("| none | mnist | 8 | ") < text.index("| relu | mnist | 8 | ")
