"""`rankpipe train`: train the ranking adapter, or fit a baseline (`--method`), from a token store."""

from __future__ import annotations

from pathlib import Path

import click

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.cli.params import NonEmptyPath


@click.command("train")
@click.option("--store", "store_path", required=True, type=NonEmptyPath(path_type=Path), help="Token store (.zarr) made by `rankpipe embed`.")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path), help="Run folder for best.pt, last.pt and history.jsonl.")
@click.option("--manifest", "manifest_path", type=NonEmptyPath(dir_okay=False, path_type=Path), help="Manifest overriding the store's split roles and target transforms (same labels).")
@click.option("--config", "config_path", type=NonEmptyPath(dir_okay=False, path_type=Path), help="YAML run config with sections adapter, loss, optim, train.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE", help="Override one run-config field; repeatable, e.g. --set loss.pairwise=hinge.")
@click.option("--label", "labels", multiple=True, help="Train on this label (repeatable); default: every label of the store with train and val images.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Shortcut for --set train.max_steps=N.")
@click.option("--batch-size", type=click.IntRange(min=2), help="Shortcut for --set train.batch_size=N (images of one query per step).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Where to train; default cuda when available.")
@click.option("--seed", type=int, help="Shortcut for --set train.seed=N.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt (same settings; --max-steps may grow).")
@click.option("--method", default=ADAPTER_METHOD, show_default=True, metavar="NAME",
              help="adapter, or a baseline: zero-shot, clip-iqa, linear-probe, coop, ordinalclip, l2rclip, rank-axis, text-axis (docs/baselines.md). "
                   "A baseline takes --set FIELD=VALUE for its own settings.")
@click.option("--backbone-weights", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Baselines with prompts: weights file of the store's backbone when its provenance needs one.")
def train(store_path, out_dir, manifest_path, config_path, overrides, labels, max_steps, batch_size, device, seed,
          resume, method, backbone_weights):
    """Train the ranking adapter on a token store's cached CLIP tokens.

    Validates on the manifest's val split every train.eval_every steps and keeps the checkpoint with
    the best mean Spearman correlation (SRCC) over the trained queries. With --method NAME a baseline
    is fitted on the store's pooled image embeddings instead and written to OUT/best.pt.
    """
    from rankpipe.devices import default_device, torch_device_for

    if device is not None:
        torch_device_for(device)  # an unknown or absent device is refused before anything is read
    if method != ADAPTER_METHOD:
        from rankpipe.adapter.baselines import get_method

        get_method(method)  # an unknown name is refused before anything is read
        adapter_only = {"--config": config_path, "--max-steps": max_steps, "--batch-size": batch_size,
                        "--seed": seed, "--resume": resume or None}
        given = [flag for flag, value in adapter_only.items() if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: option(s) of adapter training; leave them out with --method {method}")
        _fit_baseline(store_path, out_dir, manifest_path, overrides, labels, device or "cpu", method, backbone_weights)
        return
    if backbone_weights is not None:
        raise click.UsageError("--backbone-weights is for baselines with prompts; the adapter trains from the store alone")
    from tqdm import tqdm

    from rankpipe.adapter.training.checkpoint import LAST, saved_run_config
    from rankpipe.adapter.training.loop import TrainingDiverged, train_from_store
    from rankpipe.adapter.training.run_config import load_run_config
    from rankpipe.pipeline.data.manifest import load_manifest
    from rankpipe.pipeline.store import TokenStore

    shortcuts = [f"train.{name}={value}" for name, value in (("max_steps", max_steps), ("batch_size", batch_size), ("seed", seed)) if value is not None]
    base = saved_run_config(out_dir / LAST) if resume and (out_dir / LAST).exists() else None
    run_config = load_run_config(config_path, [*overrides, *shortcuts], base=base)
    store = TokenStore.open(store_path)
    manifest = load_manifest(manifest_path) if manifest_path is not None else None
    device = default_device(device)

    bar: tqdm | None = None  # made at the first step, so that input errors found before it print alone

    def show(event) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=run_config.train.max_steps, unit="step", dynamic_ncols=True)
        bar.update(event.step - bar.n)
        postfix = {name[:3]: f"{value:.4f}" for name, value in event.loss.items()}
        postfix["val_srcc"] = f"{event.latest_mean_srcc:.4f}"
        bar.set_postfix(postfix, refresh=False)

    try:
        result = train_from_store(
            store, out_dir, run_config, labels=list(labels) or None, manifest=manifest,
            device=device, resume=resume, progress=show,
        )
    except TrainingDiverged as e:
        raise click.ClickException(str(e)) from e
    finally:
        if bar is not None:
            bar.close()
    per_query = ", ".join(f"{name} {value:.4f}" for name, value in result.best_srcc.items())
    click.echo(
        f"trained {result.steps} steps; best val SRCC at step {result.best_step}: {per_query} "
        f"(mean {result.best_mean_srcc:.4f}); best checkpoint {result.best_path}"
    )


def _fit_baseline(store_path, out_dir, manifest_path, overrides, labels, device, method, backbone_weights) -> None:
    from rankpipe.adapter.baselines.fit import train_baseline
    from rankpipe.pipeline.data.manifest import load_manifest
    from rankpipe.pipeline.store import TokenStore

    store = TokenStore.open(store_path)
    manifest = load_manifest(manifest_path) if manifest_path is not None else None
    result = train_baseline(store, out_dir, method, overrides, labels=list(labels) or None, manifest=manifest,
                            device=device, backbone_weights=backbone_weights)
    per_query = ", ".join(f"{name} {value:.4f}" for name, value in result.val_srcc.items())
    click.echo(f"fitted {result.method}; val SRCC: {per_query} (mean {result.mean_srcc:.4f}); checkpoint {result.path}")
