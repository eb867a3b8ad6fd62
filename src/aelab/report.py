"""Turn sweep directories into a report: results.csv, report.md and PNG figures.

Runs are sorted into the study's parts by what they are: runs of the recipe sweeps
(`seed`, `best`, `best_denoise`, `best_ablation`) make the comparison with the classical
baselines, models trained with noise are the denoising study, runs of the `lasso_search`
sweep the lasso search, and every other run belongs to the architecture grid. Baselines
(PCA at the same size, the noisy input, the linear denoiser) are computed here on the same
test images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from aelab.baselines import denoising_scores, fixed_test_noise, pca_scores  # noqa: E402
from aelab.callbacks import image_rows  # noqa: E402
from aelab.data import IMAGE_SIDE, NUM_PIXELS, ImageDataModule  # noqa: E402
from aelab.errors import UserError  # noqa: E402
from aelab.evaluation import DATAMODULE_KEY, model_from_checkpoint, read_checkpoint  # noqa: E402
from aelab.model import DEFAULT_HIDDEN_DIMS, corrupt, variance_name  # noqa: E402
from aelab.results import collect, loss_history  # noqa: E402

log = logging.getLogger(__name__)

NUM_IMAGES = 8
DATASET_TITLES = {"mnist": "MNIST", "fmnist": "Fashion-MNIST"}
# sweeps that compare the original and the improved recipe with the classical baselines
RECIPE_SWEEPS = ("seed", "best", "best_denoise", "best_ablation")
# Hinton and Salakhutdinov (2006), Science 313: a 784-1000-500-250-30 autoencoder,
# pretrained layer by layer, reached 3.00 summed squared error per MNIST test image
HINTON_MNIST_CODE = 30
HINTON_SQUARED_ERROR = 3.00


# ---------------------------------------------------------------- tables


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table; floats rounded to `digits` significant figures."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join([header, rule, *body])


def split_study(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The finished runs sorted into recipes, grid, lasso search and denoising."""
    ok = runs[runs["status"] == "ok"]
    recipe = ok["sweep"].isin(RECIPE_SWEEPS)
    study = ok[~recipe]
    denoise = study["noise_variance"] > 0
    lasso = ~denoise & (study["sweep"] == "lasso_search")
    return {
        "grid": study[~denoise & ~lasso],
        "lasso": study[lasso],
        "denoise": study[denoise],
        "recipe": ok[recipe],
    }


def best_per_group(grid: pd.DataFrame) -> pd.DataFrame:
    """The run with the lowest validation MSE for each dataset and regularizer."""
    best = grid.loc[grid.groupby(["dataset", "regularizer"])["val/mse"].idxmin()]
    return best.sort_values(["dataset", "regularizer"])


# ---------------------------------------------------------------- data and baselines


class StudyData:
    """Train split and test images of each dataset, with their baselines, loaded once."""

    def __init__(self, data_dir: str, data_hparams: dict) -> None:
        self.data_dir = data_dir
        self.data_hparams = data_hparams
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def split(self, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
        if dataset not in self._splits:
            hparams = {**self.data_hparams, "name": dataset, "data_dir": self.data_dir}
            dm = ImageDataModule(**{**hparams, "download": False})
            dm.setup()
            self._splits[dataset] = (dm.train_images, dm.test_images)
        return self._splits[dataset]

    def pca(self, dataset: str, code_dims: list[int]) -> pd.DataFrame:
        train, test = self.split(dataset)
        return pd.DataFrame(pca_scores(train, test, sorted(set(code_dims))))

    def denoising(self, dataset: str, variances: list[float], noise_seed: int) -> pd.DataFrame:
        train, test = self.split(dataset)
        batch_size = self.data_hparams["eval_batch_size"]
        return pd.DataFrame(denoising_scores(train, test, variances, noise_seed, batch_size))


# ---------------------------------------------------------------- figures


def show_rows(ax, rows: list[torch.Tensor], labels: list[str], title: str) -> None:
    """Draw batches of flat images as labelled rows of one grid."""
    grid = image_rows(rows)
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    pitch = IMAGE_SIDE + 2
    ax.set_yticks([2 + i * pitch + IMAGE_SIDE / 2 for i in range(len(rows))], labels)
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("figure written to %s", path)
    return path


@torch.no_grad()
def reconstruct(checkpoint_path: str, images: torch.Tensor) -> torch.Tensor:
    model = model_from_checkpoint(read_checkpoint(checkpoint_path)).eval()
    return model(images)


def loss_curves_figure(best: pd.DataFrame, dataset: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in best[best["dataset"] == dataset].itertuples():
        history = loss_history(run.run_dir)
        label = f"{run.regularizer} (depth {run.depth}, code {run.code_dim})"
        line = ax.plot(history["epoch"] + 1, history["train"], label=f"{label}, train")
        ax.plot(
            history["epoch"] + 1,
            history["val"],
            "--",
            color=line[0].get_color(),
            label=f"{label}, val",
        )
    ax.set(xlabel="epoch", ylabel="loss (MSE + penalty)", yscale="log")
    ax.set_title(f"{DATASET_TITLES[dataset]}: best lasso and dropout models")
    ax.legend(fontsize=7)
    return save(fig, path)


def reconstructions_figure(best: pd.DataFrame, dataset: str, test: torch.Tensor, path: Path):
    images = test[:NUM_IMAGES]
    rows, labels = [images], ["original"]
    for run in best[best["dataset"] == dataset].itertuples():
        rows.append(reconstruct(run.best_checkpoint, images))
        labels.append(f"{run.regularizer}\nd{run.depth} c{run.code_dim}")
    fig, ax = plt.subplots(figsize=(7, 1.1 * len(rows) + 0.6))
    show_rows(ax, rows, labels, f"{DATASET_TITLES[dataset]}: test reconstructions")
    return save(fig, path)


def denoising_figure(models: pd.DataFrame, dataset: str, test: torch.Tensor, path: Path):
    images = test[:NUM_IMAGES]
    models = models.sort_values("noise_variance")
    fig, axes = plt.subplots(len(models), 1, figsize=(7, 3.6 * len(models)), squeeze=False)
    for ax, run in zip(axes[:, 0], models.itertuples(), strict=True):
        checkpoint = read_checkpoint(run.best_checkpoint)
        model = model_from_checkpoint(checkpoint).eval()
        seed = model.hparams.noise_seed
        noise = fixed_test_noise(images, seed, checkpoint[DATAMODULE_KEY]["eval_batch_size"])
        noisy = corrupt(images, run.noise_variance, noise, model.hparams.clip_noisy)
        with torch.no_grad():
            denoised = model(noisy)
        title = f"variance {run.noise_variance:g} (model trained at {run.noise_variance:g})"
        show_rows(ax, [images, noisy, denoised], ["original", "noisy", "denoised"], title)
    fig.suptitle(f"{DATASET_TITLES[dataset]}: denoising")
    return save(fig, path)


def psnr_figure(curves: dict[str, pd.Series], dataset: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, series in curves.items():
        baseline = label in ("noisy input", "linear (Wiener) denoiser")
        ax.plot(series.index, series.values, "--" if baseline else "o-", label=label)
    ax.set(xlabel="noise variance", ylabel="test PSNR (dB)")
    ax.set_title(f"{DATASET_TITLES[dataset]}: PSNR against noise variance")
    ax.legend(fontsize=7)
    return save(fig, path)


# ---------------------------------------------------------------- the report


def variance_columns(runs: pd.DataFrame, kind: str) -> dict[float, str]:
    prefix = f"test/psnr_{kind}_"
    columns = [c for c in runs.columns if c.startswith(prefix)]
    return {float(c[len(prefix) :]): c for c in columns}


def denoising_baselines(study: StudyData, dataset: str, runs: pd.DataFrame, variances):
    """PSNR of the noisy input and the linear denoiser by variance, on the noise `runs` saw."""
    hparams = read_checkpoint(runs.iloc[0]["best_checkpoint"])["hyper_parameters"]
    return study.denoising(dataset, variances, int(hparams["noise_seed"])).set_index("variance")


def denoising_table(study: StudyData, denoise: pd.DataFrame, dataset: str, best: pd.DataFrame):
    """PSNR per test variance of the noisy input, the linear denoiser and each model."""
    runs = denoise[denoise["dataset"] == dataset].sort_values("noise_variance")
    reference = runs if not runs.empty else best[best["dataset"] == dataset]
    columns = variance_columns(reference, "denoised")
    variances = sorted(columns)
    baselines = denoising_baselines(study, dataset, reference, variances)

    rows = {
        "noisy input": baselines["psnr_noisy"],
        "linear (Wiener) denoiser": baselines["psnr_linear"],
    }
    ordered = [columns[v] for v in variances]
    for _, run in runs.iterrows():
        label = f"AE trained at variance {run['noise_variance']:g}"
        rows[label] = pd.Series(run[ordered].to_numpy(float), variances)
    for _, run in best[best["dataset"] == dataset].iterrows():
        label = f"best {run['regularizer']} AE (trained without noise)"
        rows[label] = pd.Series(run[ordered].to_numpy(float), variances)
    return rows


def write_report(
    sweep_dirs: list[Path], out_dir: Path, data_dir: str, overwrite: bool = False
) -> Path:
    """Build the whole report in `out_dir` and return the path of its Markdown file."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already holds files; choose another --out or pass --overwrite")
    runs, problems = collect(sweep_dirs)
    if runs.empty or (runs["status"] == "ok").sum() == 0:
        raise UserError(f"no finished runs (metrics.json) under {', '.join(map(str, sweep_dirs))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out_dir / "results.csv", index=False)
    log.info("results written to %s", out_dir / "results.csv")

    parts = split_study(runs)
    grid, lasso, denoise = parts["grid"], parts["lasso"], parts["denoise"]
    any_run = runs[runs["status"] == "ok"].iloc[0]
    data_hparams = read_checkpoint(any_run["best_checkpoint"])[DATAMODULE_KEY]
    study = StudyData(data_dir, data_hparams)
    datasets = [d for d in DATASET_TITLES if d in set(runs.loc[runs["status"] == "ok", "dataset"])]

    md = ["# Autoencoder study report", ""]
    md += [
        f"Generated by `python report.py` from {len(sweep_dirs)} sweep director"
        f"{'y' if len(sweep_dirs) == 1 else 'ies'}: {int((runs['status'] == 'ok').sum())} "
        f"finished runs. MSE is per pixel with pixels in [0, 1]; PSNR uses a peak of 1.0 and "
        "is averaged over test images; noise is given by its variance. Every number below "
        "is on the test set, except the validation MSE used to choose the best "
        "models. One row per run, with every config knob and test metric: "
        "[results.csv](results.csv).",
        "",
    ]
    md += ["## Missing or failed runs", ""]
    md += (
        [f"- {p}" for p in problems] if problems else ["None: every job of every sweep finished."]
    )
    md.append("")

    if not grid.empty:
        md += grid_sections(study, grid, datasets, out_dir)
    best = best_per_group(grid) if not grid.empty else grid
    if not lasso.empty:
        md += lasso_section(lasso)
    if not denoise.empty or not best.empty:
        md += denoise_sections(study, denoise, best, datasets, out_dir)
    if not parts["recipe"].empty:
        md += recipe_sections(study, parts["recipe"], datasets)

    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    log.info("report written to %s", path)
    return path


def grid_sections(study: StudyData, grid: pd.DataFrame, datasets: list[str], out_dir: Path):
    pca = {d: study.pca(d, list(grid["code_dim"])).set_index("code_dim") for d in datasets}
    grid = grid.copy()
    grid["pca/mse"] = [pca[r.dataset].loc[r.code_dim, "mse"] for r in grid.itertuples()]
    grid["pca/psnr"] = [pca[r.dataset].loc[r.code_dim, "psnr"] for r in grid.itertuples()]
    best = best_per_group(grid)

    columns = {
        "dataset": "dataset",
        "regularizer": "regularizer",
        "depth": "depth",
        "code_dim": "code",
        "val/mse": "val MSE",
        "test/loss": "test loss",
        "test/mse": "test MSE",
        "test/psnr": "test PSNR",
        "pca/mse": "PCA MSE",
        "pca/psnr": "PCA PSNR",
    }
    md = ["## Best model per dataset and regularizer", ""]
    md += [
        "Chosen by validation MSE among the grid's runs. PCA uses as many components as "
        "the code has dimensions, fitted on the same training images.",
        "",
        markdown_table(best[list(columns)].rename(columns=columns)),
        "",
    ]
    for dataset in datasets:
        title = DATASET_TITLES[dataset]
        curves = loss_curves_figure(best, dataset, out_dir / f"loss_curves_{dataset}.png")
        _, test = study.split(dataset)
        recon = out_dir / f"reconstructions_{dataset}.png"
        reconstructions_figure(best, dataset, test, recon)
        md += [
            f"![{title} loss curves]({curves.name})",
            "",
            f"![{title} reconstructions]({recon.name})",
            "",
        ]

    md += ["## Full grid", ""]
    ordered = grid.sort_values(["dataset", "regularizer", "depth", "code_dim"])
    grid_columns = {**columns, "mean_epoch_time": "s/epoch"}
    md += [markdown_table(ordered[list(grid_columns)].rename(columns=grid_columns)), ""]
    return md


def lasso_section(lasso: pd.DataFrame) -> list[str]:
    columns = {
        "dataset": "dataset",
        "depth": "depth",
        "code_dim": "code",
        "l1_target": "L1 on",
        "l1_weight": "L1 weight",
        "val/mse": "val MSE",
        "test/loss": "test loss",
        "test/mse": "test MSE",
        "test/psnr": "test PSNR",
    }
    ordered = lasso.sort_values(["dataset", "l1_weight"])
    best = lasso.loc[lasso.groupby("dataset")["val/mse"].idxmin()]
    chosen = ", ".join(f"{r.dataset}: {r.l1_weight:g}" for r in best.itertuples())
    return [
        "## Lasso weight search",
        "",
        f"Weight with the lowest validation MSE: {chosen}.",
        "",
        markdown_table(ordered[list(columns)].rename(columns=columns)),
        "",
    ]


def denoise_sections(study, denoise, best, datasets, out_dir) -> list[str]:
    md = ["## Denoising", ""]
    md += [
        "Test PSNR (dB) at each noise variance: of the noisy input itself, of the best "
        "linear (Wiener) denoiser fitted on the training images at that variance (output "
        "clipped to [0, 1]), and of the autoencoders. All see the same noisy test images.",
        "",
    ]
    for dataset in datasets:
        title = DATASET_TITLES[dataset]
        rows = denoising_table(study, denoise, dataset, best)
        table = pd.DataFrame(rows).T
        table.columns = [f"var {variance_name(v)}" for v in table.columns]
        table.insert(0, "model", table.index)
        md += [f"### {title}", "", markdown_table(table, digits=4), ""]
        figure = psnr_figure(rows, dataset, out_dir / f"psnr_vs_variance_{dataset}.png")
        md += [f"![{title} PSNR against variance]({figure.name})", ""]
        models = denoise[denoise["dataset"] == dataset]
        if not models.empty:
            _, test = study.split(dataset)
            grids = denoising_figure(models, dataset, test, out_dir / f"denoising_{dataset}.png")
            md += [f"![{title} denoising]({grids.name})", ""]
    return md


# ---------------------------------------------------------------- recipes and baselines


def training_minutes(run) -> float:
    return run["mean_epoch_time"] * run["epochs"] / 60


def chosen(runs: pd.DataFrame) -> pd.Series | None:
    """The run with the lowest validation MSE, or None."""
    return runs.loc[runs["val/mse"].idxmin()] if not runs.empty else None


def describe_recipe(run) -> str:
    hidden = run["hidden_dims"]
    if not isinstance(hidden, str):
        hidden = "-".join(map(str, DEFAULT_HIDDEN_DIMS[int(run["depth"])]))
    if run["lr_schedule"] == "constant":
        lr = f"a constant learning rate of {run['lr']:g}"
    else:
        lr = f"a {run['lr_schedule']} learning rate peaking at {run['lr']:g}"
    # runs from before these settings existed trained without weight decay, in fp32
    decay = run.get("weight_decay")
    optimizer = f"AdamW (weight decay {decay:g})" if decay and decay > 0 else "Adam"
    precision = run.get("precision")
    precision = "" if precision in (None, "32-true") or pd.isna(precision) else f", {precision}"
    epochs = int(run["max_epochs"])
    return (
        f"depth {run['depth']}, hidden widths {hidden}, {run['activation']}, batch norm "
        f"{'on' if run['batch_norm'] else 'off'}, {optimizer} with {lr}, "
        f"batch {run['batch_size']}, {epochs} epoch{'' if epochs == 1 else 's'}{precision}"
    )


def recipe_sections(study: StudyData, recipe: pd.DataFrame, datasets: list[str]) -> list[str]:
    by_sweep = {name: recipe[recipe["sweep"] == name] for name in RECIPE_SWEEPS}
    md = ["## Recipes against the classical baselines", ""]
    for name in ("seed", "best"):
        if not by_sweep[name].empty:
            md.append(f"- `{name}` recipe: {describe_recipe(by_sweep[name].iloc[0])}.")
    md += [
        "- Minutes: training time of each model (its epochs' wall time), as it ran.",
        "",
    ]
    reconstruction = pd.concat([by_sweep["seed"], by_sweep["best"]])
    if not reconstruction.empty:
        md += reconstruction_section(study, reconstruction, datasets)
    if not by_sweep["best_denoise"].empty:
        md += recipe_denoising_section(study, by_sweep["best_denoise"], datasets)
    if not by_sweep["best_ablation"].empty:
        md += ablation_section(by_sweep["best_ablation"])
    return md


def reconstruction_section(study, runs, datasets) -> list[str]:
    """Test MSE of both recipes at each code size, against PCA and Hinton's autoencoder."""
    rows = []
    for dataset in datasets:
        runs_here = runs[runs["dataset"] == dataset]
        if runs_here.empty:
            continue
        codes = sorted(set(runs_here["code_dim"]))
        pca = study.pca(dataset, codes).set_index("code_dim")["mse"]
        for code in codes:
            at_code = runs_here[runs_here["code_dim"] == code]
            seed = chosen(at_code[at_code["sweep"] == "seed"])
            ours = chosen(at_code[at_code["sweep"] == "best"])
            hinton = math.nan
            if dataset == "mnist" and code == HINTON_MNIST_CODE:
                hinton = HINTON_SQUARED_ERROR / NUM_PIXELS
            ours_mse = ours["test/mse"] if ours is not None else math.nan
            rows.append(
                {
                    "dataset": dataset,
                    "code": code,
                    "seed MSE": seed["test/mse"] if seed is not None else math.nan,
                    "best MSE": ours_mse,
                    "best squared error per image": ours_mse * NUM_PIXELS,
                    "PCA MSE": pca[code],
                    "best / PCA": ours_mse / pca[code],
                    "Hinton & Salakhutdinov MSE": hinton,
                    "best minutes": training_minutes(ours) if ours is not None else math.nan,
                }
            )
    return [
        "### Reconstruction: test MSE against PCA",
        "",
        "PCA keeps as many components as the code has dimensions and is fitted on the same "
        f"training images. Hinton & Salakhutdinov (2006) report {HINTON_SQUARED_ERROR:.2f} "
        "summed squared error per MNIST test image for their pretrained "
        f"784-1000-500-250-{HINTON_MNIST_CODE} autoencoder.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]


def recipe_denoising_section(study, denoise, datasets) -> list[str]:
    """PSNR of the model trained at each variance, tested at it, against the linear one."""
    md = [
        "### Denoising: test PSNR (dB) against the linear (Wiener) denoiser",
        "",
        "Each model is trained at one variance and tested at the same variance; the linear "
        "denoiser is fitted on the training images at that variance. All see the same noisy "
        "test images.",
        "",
    ]
    for dataset in datasets:
        runs = denoise[denoise["dataset"] == dataset]
        if runs.empty:
            continue
        columns = variance_columns(runs, "denoised")
        baselines = denoising_baselines(study, dataset, runs, sorted(columns))
        rows = []
        for variance, at_variance in runs.groupby("noise_variance"):
            ours = chosen(at_variance)
            linear = baselines.loc[variance, "psnr_linear"]
            psnr = ours[columns[variance]]
            rows.append(
                {
                    "variance": variance,
                    "noisy input": baselines.loc[variance, "psnr_noisy"],
                    "linear denoiser": linear,
                    "best recipe": psnr,
                    "gain (dB)": psnr - linear,
                    "best minutes": training_minutes(ours),
                }
            )
        md += [f"#### {DATASET_TITLES[dataset]}", "", markdown_table(pd.DataFrame(rows)), ""]
    return md


def ablation_section(ablation: pd.DataFrame) -> list[str]:
    """Each ingredient of the best recipe taken out in turn, against the full recipe."""
    rows = []
    for (dataset, code), runs in ablation.groupby(["dataset", "code_dim"], sort=False):
        full = runs[runs["ablation"] == "none"]
        reference = full.iloc[0]["test/mse"] if not full.empty else math.nan
        # the full recipe first, then the changes in the order the sweep ran them
        for _, run in pd.concat([full, runs[runs["ablation"] != "none"]]).iterrows():
            rows.append(
                {
                    "change to the best recipe": run["ablation"],
                    "dataset": dataset,
                    "code": code,
                    "test MSE": run["test/mse"],
                    "MSE / full recipe": run["test/mse"] / reference,
                    "s/epoch": run["mean_epoch_time"],
                    "minutes": training_minutes(run),
                }
            )
    return [
        "### Ablation of the best recipe",
        "",
        "One change at a time against the full recipe (`none`); a ratio above 1 means the "
        "ingredient taken out was helping.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]
